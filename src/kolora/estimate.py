"""`kolora estimate`: predict peak memory and time per step of a training config, with a
verdict (fits / what to change). The model of memory and time is `kolora.estimator`."""

from __future__ import annotations

from .config import add_config_flags, build_config
from .estimator import estimate

HELP = "predict peak memory and time per step of a training config, with a verdict (fits / what to change)"


def add_arguments(parser) -> None:
    add_config_flags(parser)
    parser.add_argument("--device", default="cpu",
                        help="cpu (this machine's RAM), cuda:<N>GB for a GPU with N GiB (e.g. cuda:8GB), "
                             "or cuda for the GPU here")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for the time estimate")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")


def run(args) -> int:
    import json

    est = estimate(build_config(args), args.device, args.peak_tflops)
    if args.json:
        print(json.dumps(est.to_json(), indent=2, ensure_ascii=False))
    else:
        for line in est.lines():
            print(line)
    return 0
