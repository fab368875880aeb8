"""Build filtered RAVEL train/validation/test arrow sets for a converted target (hyperdas_jax/data/build.py).

  python -m tools.prepare_ravel --target checkpoints/smollm2 --domains city --out data/smollm2_city
  python -m tools.prepare_ravel --target checkpoints/smollm2 --domains city --attributes Country Continent \
      --n-train 1500 --n-test 300 --filter original --out data/smollm2_city_original

Train and validation come from disjoint sets of RAVEL's train templates, test from its val + test
templates. --screen-entities N first keeps only the entities the target knows.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from tools.cli import answer_tokens, fraction


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ravel", default=None,
                        help="RAVEL data.tgz, extracted folder or URL (default: the archive packaged with "
                             "hyperdas_jax, sha256-checked)")
    parser.add_argument("--cache-dir", default=None,
                        help="where a downloaded archive is kept (default ~/.cache/hyperdas_jax/ravel)")
    parser.add_argument("--target", required=True, help="converted target directory, e.g. checkpoints/smollm2")
    parser.add_argument("--domains", nargs="+", required=True, help="RAVEL domains, e.g. city")
    parser.add_argument("--attributes", nargs="+", default=None,
                        help="intervened attributes (default: every attribute with values)")
    parser.add_argument("--n-train", type=int, default=20_000, help="rows per attribute from train templates")
    parser.add_argument("--n-test", type=int, default=4_000, help="rows per attribute from val+test templates")
    parser.add_argument("--validation-fraction", type=fraction, default=0.1,
                        help="share of train templates (and their rows) held out as validation")
    parser.add_argument("--filter", choices=("strict", "original"), default="strict",
                        help="strict: base answered right (a), verify_text answered right (b), causal values "
                             "differ (c); original: (b) only, as HyperDAS did")
    parser.add_argument("--n-answer-tokens", type=answer_tokens("auto"), default="auto",
                        help="answer tokens the checks compare, or 'all' (default: 3 for strict, all for original)")
    parser.add_argument("--isolate-attributes", nargs="+", default=None,
                        help="attributes isolate rows may ask (default: every attribute with values)")
    parser.add_argument("--screen-entities", type=int, default=0,
                        help="before generating, probe this many entities per asked attribute and draw base "
                             "(and causal source) entities only from those the target knows; 0 = off (the "
                             "original's draw from all entities)")
    parser.add_argument("--screen-templates", type=int, default=2,
                        help="train templates each screened entity must answer right")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per filter forward pass")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "auto"), default="float32",
                        help="the target's compute dtype for the screen and the filter: the one that will train "
                             "and score on the rows (a config's target.dtype), so every kept base prompt is "
                             "answered right by it (default: float32)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", required=True, help="output folder for train/ validation/ test/ and the report")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if min(args.n_train, args.n_test) < 0 or args.batch_size < 1:
        parser.error("--n-train and --n-test must be >= 0 and --batch-size >= 1")
    if args.screen_entities and (args.screen_entities < 2 or args.screen_templates < 1):
        parser.error("--screen-entities must be 0 or >= 2 and --screen-templates >= 1")

    from hyperdas_jax.data.build import BuildOptions, build, report_markdown
    from hyperdas_jax.data.ravel_raw import RavelError
    from hyperdas_jax.target import TargetError

    options = BuildOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildOptions)})
    try:
        report = build(options)
    except (RavelError, TargetError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    print(report_markdown(report))
    print(f"wrote {args.out} in {report['timings']['total_s']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
