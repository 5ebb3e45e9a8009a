"""`python -m servers COMMAND ...`: the reference servers and their tools without the loadgen CLI.

    python -m servers make-repo ./models
    python -m servers triton --model-repository ./models --http-port 8000 --grpc-port 8001
    python -m servers calibration --port 8000 --delay-ms 20
    python -m servers torchserve --model-store ./store --models mlp=mlp.mar
    python -m servers openai-mock --port 8000 --ttft-ms 30 --itl-ms 10
    python -m servers llm-sim --port 8000 --max-batch 32 --decode-ms 12
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

_USAGE = ("usage: python -m servers {triton,torchserve,openai-mock,llm-sim,calibration,make-repo} [ARGS...] "
          "(--help after a command for its flags)")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE, file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    command, rest = args[0], args[1:]
    if command == "triton":
        from servers.triton.__main__ import main as run
    elif command == "calibration":
        from servers.calibration.__main__ import main as run
    elif command == "torchserve":
        from servers.torchserve.__main__ import main as run
    elif command == "openai-mock":
        from servers.openai_mock.__main__ import main as run
    elif command == "llm-sim":
        from servers.llm_sim.__main__ import main as run
    elif command == "make-repo":
        from servers.models.make_repo import main as run
    else:
        print(f"{_USAGE}\nerror: unknown command {command!r}", file=sys.stderr)
        return 2
    return run(rest, prog=f"python -m servers {command}")


if __name__ == "__main__":
    sys.exit(main())
