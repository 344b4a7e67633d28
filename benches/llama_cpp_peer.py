"""llama.cpp's half of benches/llama_cpp.sh: prompt processing and generation
tokens/s for one GGUF, greedy, the same prompt and thread count as Gust's
runner. Prints one line per round in the runner's format:

    llama.cpp pp_tokens=P pp_tps=... tg_tokens=N tg_tps=... tokens=[...]

Usage: python llama_cpp_peer.py GGUF PROMPT GEN ROUNDS THREADS
"""

import sys
import time

from llama_cpp import Llama


def main() -> None:
    gguf, prompt, generate, rounds, threads = sys.argv[1:6]
    generate, rounds, threads = int(generate), int(rounds), int(threads)
    model = Llama(
        model_path=gguf,
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=2048,
        n_batch=512,
        logits_all=False,
        verbose=False,
    )
    ids = model.tokenize(prompt.encode(), add_bos=False, special=True)

    def run():
        model.reset()
        tokens = []
        started = time.perf_counter()
        first = None
        # Greedy: llama-cpp-python's sampler with top_k=1 and no penalty.
        for token in model.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            tokens.append(token)
            if len(tokens) == generate:
                break
        ended = time.perf_counter()
        return tokens, started, first, ended

    run()  # warm
    for _ in range(rounds):
        tokens, started, first, ended = run()
        pp, tg = first - started, ended - first
        print(
            f"llama.cpp pp_tokens={len(ids)} pp_tps={len(ids) / pp:.1f} "
            f"tg_tokens={len(tokens) - 1} tg_tps={(len(tokens) - 1) / tg:.1f} tokens={tokens}",
            flush=True,
        )


if __name__ == "__main__":
    main()
