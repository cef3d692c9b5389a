"""``python -m pub_native``: how this copy was built and what it can run on;
``python -m pub_native --version``: the version;
``python -m pub_native demo``: the multi-task comparison of ``pub_native.demo``."""

from __future__ import annotations

import platform
import sys

from . import __version__
from ._native import _C, _CUDA_IMPORT_ERROR, _C_cuda


def build_report() -> dict:
    info = dict(_C.build_info())
    info["package_version"] = __version__
    info["python"] = platform.python_version()
    info["omp_max_threads"] = _C.omp_max_threads()
    info["cuda_compiled"] = _C_cuda is not None
    if _C_cuda is not None:
        info.update(_C_cuda.build_info())
        info["cuda_devices"] = _C_cuda.device_count()
        try:
            import torch

            if torch.cuda.is_available():
                for d in range(torch.cuda.device_count()):
                    props = torch.cuda.get_device_properties(d)
                    info[f"cuda_device_{d}"] = (
                        f"{props.name}, sm_{props.major}{props.minor}, "
                        f"{props.total_memory / 2**30:.0f} GiB"
                    )
        except Exception as exc:  # report, never fail: this is a diagnostic
            info["cuda_device_error"] = str(exc)
    elif _CUDA_IMPORT_ERROR is not None and info.get("cuda_option") != "OFF":
        info["cuda_import_error"] = str(_CUDA_IMPORT_ERROR)
    return info


USAGE = """usage: python -m pub_native [info]           print version and build configuration
       python -m pub_native --version       print the version
       python -m pub_native demo [options]  PUB vs gradient balancers on UCI Adult (MMoE/PLE);
                                            python -m pub_native demo --help for the options"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] not in ("info", "-h", "--help", "-V", "--version"):
        print(f"unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    if len(argv) > 1:
        print(f"unexpected arguments after {argv[0]!r}: {' '.join(argv[1:])}\n{USAGE}",
              file=sys.stderr)
        return 2
    if argv and argv[0] in ("-V", "--version"):
        print(f"pub_native {__version__}")
        return 0
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    info = build_report()
    width = max(len(k) for k in info)
    print(f"pub_native {info['package_version']}")
    for key, value in info.items():
        print(f"  {key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
