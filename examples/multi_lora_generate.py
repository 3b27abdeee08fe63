"""One base model, 8 LoRA adapters, one batched greedy `generate` with a different adapter per row,
checked against running each row with its adapter alone.

    python examples/multi_lora_generate.py                     # a tiny Llama from a config, on CPU
    python examples/multi_lora_generate.py --model meta-llama/Llama-3.2-1B --device cuda

Without --model the base is a small random Llama and the adapters are random PEFT adapters of
different ranks and targets, saved to a temporary folder and loaded back as a server would load them.
"""
from __future__ import annotations

import argparse
import tempfile

import torch


def make_base(model_name, device):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model_name:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        return AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype).to(device).eval()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).to(device).eval()


def save_adapters(base_factory, folder, count):
    """``count`` random PEFT adapters (ranks 2..16, attention only or all linear layers), saved as PEFT does."""
    import peft

    names = []
    for i in range(count):
        torch.manual_seed(100 + i)
        targets = "all-linear" if i % 2 else ["q_proj", "k_proj", "v_proj", "o_proj"]
        config = peft.LoraConfig(r=2 << (i % 4), lora_alpha=16, target_modules=targets, init_lora_weights=False)
        model = peft.get_peft_model(base_factory(), config)
        name = f"adapter{i}"
        model.save_pretrained(f"{folder}/{name}")
        names.append(name)
    return names


def main():
    import fastpeft

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face model id (default: a tiny random Llama)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        names = save_adapters(lambda: make_base(args.model, args.device), folder, 8)
        model = make_base(args.model, args.device)
        ml = fastpeft.MultiLora(model, max_adapters=8, max_rank=16, target_modules="all-linear")
        for name in names:
            ml.load_adapter(name, f"{folder}/{name}")
        rows = [names[i % len(names)] for i in range(10)] + [None, None]  # two rows on the base model
        prompt = torch.randint(3, 100, (len(rows), 6), generator=torch.Generator().manual_seed(1)).to(args.device)
        # min_new_tokens: every row runs the same number of steps (an early EOS would pad the batched rows)
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad(), ml.use(rows):
            batched = model.generate(prompt, **kwargs)
        with torch.no_grad():
            for i, name in enumerate(rows):
                with ml.use([name]):
                    alone = model.generate(prompt[i:i + 1], **kwargs)
                same = torch.equal(alone, batched[i:i + 1])
                print(f"row {i:2d} {name or 'base':9s} {batched[i, prompt.shape[1]:].tolist()} "
                      f"{'== alone' if same else '!= alone: ' + str(alone[0, prompt.shape[1]:].tolist())}")
                if not same:
                    raise SystemExit(f"row {i}: the batched tokens differ from the adapter run alone")
    print(f"{len(rows)} rows, {len(names)} adapters, one batched generate: every row equals its adapter alone")


if __name__ == "__main__":
    main()
