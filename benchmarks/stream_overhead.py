"""What watching requests costs a batch: the engine with and without streaming requests in it.

    python benchmarks/stream_overhead.py                   # debug model, 384 px = 576 codes, CPU
    python benchmarks/stream_overhead.py --batch 16 --streaming 8 --repeats 5

One batch of `--batch` text-to-image requests (different prompts and seeds), generated twice per
repeat, alternating: plain, and with the first `--streaming` of them watched as the server
watches a streaming request (3 partial images each, decoded and PNG-encoded in another thread
while the batch goes on; `--no-decode`: only handed out, the engine's own cost). Prints the median seconds of each, their ratio (the overhead), and
checks that the codes are the same both ways.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import statistics
import sys
import time

import torch

from janus_lab.generation import GenerationEngine, GenerationRequest
from janus_lab.generation.progress import RequestProgress
from janus_lab.model import debug


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="requests in the batch (default 8)")
    parser.add_argument("--streaming", type=int, default=4, help="of them watched (default 4)")
    parser.add_argument("--image-size", type=int, default=384, help="debug model side in px (default 384)")
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs (default 3)")
    parser.add_argument("--no-decode", action="store_true",
                        help="watch without decoding the partials: the engine's own cost of watching alone")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    engine = GenerationEngine.from_bundle(debug(image_size=args.image_size))
    requests = [GenerationRequest(f"a red circle number {i}", seed=i) for i in range(args.batch)]
    prepared = engine.validate(requests)
    pool = concurrent.futures.ThreadPoolExecutor(2)  # the server decodes partials off the loop too
    pending: list[concurrent.futures.Future] = []

    def encode(codes, rows) -> int:
        total = 0
        for image in engine.decode_partial(codes, rows):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            total += len(buffer.getvalue())
        return total

    def watchers() -> list[RequestProgress | None]:
        def on_partial(index, codes, rows):
            if not args.no_decode:
                pending.append(pool.submit(encode, codes, rows))
        return [RequestProgress(partial_images=3, on_partial=on_partial) if i < args.streaming else None
                for i in range(args.batch)]

    def timed(progress) -> tuple[float, list]:
        start = time.perf_counter()
        results = engine.generate_prepared(prepared, progress=progress)
        for future in pending:
            future.result()
        seconds = time.perf_counter() - start
        pending.clear()
        return seconds, results

    timed(None)  # warm-up
    plain, watched = [], []
    for _ in range(args.repeats):
        seconds, reference = timed(None)
        plain.append(seconds)
        seconds, results = timed(watchers())
        watched.append(seconds)
        assert all(torch.equal(a.codes, b.codes) for a, b in zip(reference, results)), "streaming changed the codes"
    print(f"batch of {args.batch} requests at {args.image_size} px ({engine.num_image_tokens} codes), "
          f"{args.streaming} streaming with 3 partial images each, {torch.get_num_threads()} threads")
    p, w = statistics.median(plain), statistics.median(watched)
    print(f"  plain:     {p:.2f} s per batch (median of {args.repeats})")
    print(f"  streaming: {w:.2f} s per batch" + (", partials handed out, not decoded" if args.no_decode else
                                                  ", partial images decoded and encoded included"))
    print(f"  overhead: {w / p:.3f}x (codes equal both ways)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
