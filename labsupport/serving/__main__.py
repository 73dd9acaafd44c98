"""python -m labsupport.serving --model small --policy continuous --port 8000

Serves a zoo model over an OpenAI-compatible API on 127.0.0.1 (other hosts only with --host).
Ctrl-C or SIGTERM stops it: requests in flight finish (up to 10 s) or are cancelled.
"""

import argparse

import uvicorn

from .. import data, runtime, zoo
from ..model import Transformer
from .engine import POLICIES, Engine
from .server import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m labsupport.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=zoo.names())
    parser.add_argument("--policy", default="continuous", choices=POLICIES)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--window-ms", type=float, default=50.0, help="dynamic batching window")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--random-init", action="store_true",
                        help="serve an untrained model of the recipe's shape: for load tests "
                             "(speed does not depend on the weights); its answers are noise")
    args = parser.parse_args(argv)
    if args.random_init:
        model = Transformer(zoo.spec(args.model).model)
    else:
        model = zoo.load(args.model)
    model = model.to(runtime.device())
    engine = Engine(model, args.max_batch, args.policy, window_s=args.window_ms / 1000,
                    max_queue=args.max_queue)
    app = create_app(engine, args.model, data.tokenizer(model.cfg.vocab_size))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
