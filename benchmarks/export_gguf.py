"""``peftkit export`` on SmolLM2-135M-Instruct: time, peak memory, file sizes, and llama.cpp's agreement.

    python benchmarks/export_gguf.py            # needs llama-cpp-python for the agreement table
    python benchmarks/export_gguf.py --rounds 5

An adapter (LoRA r16 on all linear layers, A and B random so the update matters: B ~ N(0, 0.01)) is saved
once; then each export (merged f32 / f16 / q8_0, the LoRA GGUF) runs in a fresh process, round-robin
over ``--rounds`` rounds, and reports its wall time (loading the base model and the adapter included)
and the process's peak RSS, next to the RSS of the same process after its imports and before it opens
anything (so "export's own" memory is the difference). The model's float32 weights are 513 MiB.
Then llama.cpp runs each file (a float32 KV cache) against peftkit with the adapter on four prompts:
greedy tokens (20), teacher-forced top-1 agreement, and the largest logit difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, table

WORKER = """
import json, resource, sys, time
import torch, transformers, gguf  # the imports every export pays for, before the baseline
import peftkit.export.gguf_export as gguf_export
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
source, out, fmt, outtype = sys.argv[1:5]
torch.set_num_threads(int(sys.argv[5]))
started = time.perf_counter()
gguf_export.export(source, out, format=fmt, outtype=outtype, overwrite=True)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "baseline_kib": baseline, "peak_kib": peak}))
"""
EXPORTS = [("gguf", "f32"), ("gguf", "f16"), ("gguf", "q8_0"), ("gguf-lora", "f32")]


def _adapter(directory: Path) -> Path:
    import torch

    import peftkit
    from peftkit.models import load_model

    base, _ = load_model()
    torch.manual_seed(0)
    config = peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    model = peftkit.wrap(base, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)
    model.save_pretrained(directory)
    return directory


def _run(source: Path, out: Path, fmt: str, outtype: str, threads: int) -> dict:
    command = [sys.executable, "-c", WORKER, str(source), str(out), fmt, outtype, str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _agreement(adapter: Path, files: dict[tuple[str, str], Path]) -> list[list[str]]:
    import peftkit
    from peftkit.export.gguf_export import export
    from peftkit.export.verify import verify_gguf
    from peftkit.models import load_model

    base, tokenizer = load_model()
    model = peftkit.load(base, adapter)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_gguf = Path(tmp) / "base.gguf"
        export("smollm2-135m-instruct", base_gguf, outtype="f32")
        for (fmt, outtype), path in files.items():
            gguf, lora = (base_gguf, path) if fmt == "gguf-lora" else (path, None)
            report = verify_gguf(gguf, model, tokenizer, lora_path=lora)
            equal = sum(row.matching_tokens == row.new_tokens and row.same_tokens for row in report.rows)
            agreement = statistics.mean(row.top1_agreement for row in report.rows)
            error = max(row.max_logit_error for row in report.rows)
            rows.append(
                [f"{fmt} {outtype}", f"{equal}/{len(report.rows)}", f"{agreement:.1%}", f"{error:.2e}"]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the agreement table")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter = _adapter(root / "adapter")
        files = {(fmt, outtype): root / f"{fmt}-{outtype}.gguf" for fmt, outtype in EXPORTS}
        results: dict[tuple[str, str], list[dict]] = {key: [] for key in files}
        for round_index in range(args.rounds):
            order = EXPORTS[round_index % len(EXPORTS) :] + EXPORTS[: round_index % len(EXPORTS)]
            for fmt, outtype in order:
                results[(fmt, outtype)].append(
                    _run(adapter, files[(fmt, outtype)], fmt, outtype, args.threads)
                )
        f32_size = files[("gguf", "f32")].stat().st_size
        rows = []
        for key, runs in results.items():
            seconds = statistics.median(r["seconds"] for r in runs)
            peak = max(r["peak_kib"] for r in runs) / 1024
            own = max(r["peak_kib"] - r["baseline_kib"] for r in runs) / 1024
            size = files[key].stat().st_size
            ratio = f"{size / f32_size:.3f}x"
            rows.append(
                [
                    f"{key[0]} {key[1]}",
                    f"{seconds:.1f}",
                    f"{peak:.0f}",
                    f"{own:.0f}",
                    f"{size / 2**20:.1f}",
                    ratio,
                ]
            )
        headers = [
            "export",
            "seconds (median)",
            "peak RSS MiB",
            "export's own MiB",
            "file MiB",
            "vs f32 file",
        ]
        print(table(headers, rows))
        if not args.no_llama_cpp:
            print()
            headers = ["file", "greedy 20 tokens equal", "top-1 agreement", "max |Δ logit|"]
            print(table(headers, _agreement(adapter, files)))


if __name__ == "__main__":
    main()
