"""`make demo`: SmolLM2-135M-Instruct end to end on the CPU.

Fetches the model (once), quantizes it to int4 and int3.5, prints size / bits per weight / error against
float / perplexity, then answers one chat prompt with the float, int4 and int3.5 models, streaming. The quantized
models are set up as `lowbit generate` sets them up on the CPU: an int8 output head and a float16 KV cache.
"""

import time

import torch

import lowbit
from lowbit import data
from lowbit.eval import linear_stats, model_bytes, perplexity

PROMPT = "Give me three short tips for staying focused while studying."
FORMATS = [("int4", 4, 64), ("int3.5", 3.5, 64)]  # (name, bits, group size): no padding at K = 576
EVAL_TOKENS = 2048


def main():
    torch.manual_seed(0)
    print(f"lowbit {lowbit.__version__}: CPU kernels '{lowbit.cpu_isa()}', {torch.get_num_threads()} threads")
    path = lowbit.fetch("smollm2")
    print(f"model: {path}")
    float_model = lowbit.LlamaForCausalLM.from_pretrained(path)
    tok = float_model.tokenizer
    models = {"float32": float_model}
    calib = data.calibration_tokens(tok, n_samples=8, seq_len=512)
    for name, bits, group_size in FORMATS:
        start = time.perf_counter()
        models[name] = lowbit.quantize_model(float_model, bits, group_size, method="awq", calib=calib, inplace=False,
                                             quantize_lm_head=True, lm_head_bits=8)
        print(f"quantized to {name} (AWQ, group size {group_size}) in {time.perf_counter() - start:.1f} s")

    ids = data.evaluation_tokens(tok, max_tokens=EVAL_TOKENS + 1)
    with torch.inference_mode():
        reference = float_model(ids[:, :512])
    print()
    print(f"{'format':<8} {'model MB':>9} {'bits/weight':>12} {'logit rel. RMSE':>16} {'top-1 agree':>12} "
          f"{'perplexity':>11}")
    for name, model in models.items():
        n, nbytes = linear_stats(model)
        with torch.inference_mode():
            logits = model(ids[:, :512])
        rel = ((logits - reference).norm() / reference.norm()).item()
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        ppl = perplexity(model, ids, seq_len=512, progress=False)
        bpw = f"{8 * nbytes / n:.2f}" if n else "32"
        print(f"{name:<8} {model_bytes(model) / 1e6:>9.1f} {bpw:>12} {rel:>16.4f} {agree:>12.3f} {ppl:>11.2f}")
    print(f"\nbits/weight: quantized linear layers (the int8 output head, a copy of the tied embedding, included), "
          f"scales and zeros included; the embedding stays float32.\nErrors against float32 over 512 held-out "
          f"tokens, perplexity over {EVAL_TOKENS} (lowbit.data: Python reference docs, evaluation split).")

    messages = [{"role": "user", "content": PROMPT}]
    print(f"\nchat prompt: {PROMPT}")
    for name, model in models.items():
        model.kv_cache_dtype = torch.float16  # as lowbit generate keeps it on the CPU: half the bytes attention reads
        print(f"\n--- {name} ---")
        stream = lowbit.stream(model, messages, max_new_tokens=96, repetition_penalty=1.1)
        for piece in stream:
            print(piece, end="", flush=True)
        print(f"\n[{stream.stats}]")


if __name__ == "__main__":
    main()
