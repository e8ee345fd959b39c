"""``jaxinfer client``: talk to a running ``jaxinfer serve`` (generate streams to the terminal)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    c = common.add_argument_group("connection")
    c.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the server")
    c.add_argument("--auth-token-file", help="file holding the bearer token")
    c.add_argument("--tls-ca", help="PEM root certificate(s): connect over TLS")
    c.add_argument("--tls", action="store_true", help="connect over TLS with the system roots")
    c.add_argument("--timeout", type=float, help="deadline of the call in seconds")

    p = sub.add_parser(
        "client", help="call a jaxinfer server", description="Call a running jaxinfer gRPC server.",
    )
    cmds = p.add_subparsers(dest="client_command", metavar="CALL", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    g = cmds.add_parser("generate", parents=[common], formatter_class=fmt, help="stream a generation to stdout")
    g.add_argument("prompt", nargs="?", help="prompt text (or --prompt-file / stdin with '-')")
    g.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    g.add_argument("--system", help="system message (with --chat)")
    g.add_argument("--token-ids", help="comma-separated prompt token ids instead of text")
    g.add_argument("--max-tokens", type=int, help="tokens to generate (default: the server's)")
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, help="return logprobs with N top alternatives (implies --json output)")
    g.add_argument("--echo", action="store_true", help="return the prompt token ids")
    g.add_argument("--truncate-prompt", action="store_true", help="keep only the last prompt tokens that fit")
    g.add_argument("--request-id", default="")
    g.add_argument("--json", action="store_true", help="print every response as a JSON line")
    g.set_defaults(func=_generate)

    s = cmds.add_parser("score", parents=[common], formatter_class=fmt, help="log p(continuation | context)")
    s.add_argument("--context", required=True)
    s.add_argument("--continuation", action="append", required=True, help="repeatable")
    s.set_defaults(func=_score)

    t = cmds.add_parser("tokenize", parents=[common], formatter_class=fmt, help="text -> token ids")
    t.add_argument("text")
    t.add_argument("--chat", action="store_true", help="render the text as a user message first")
    t.add_argument("--no-bos", action="store_true")
    t.set_defaults(func=_tokenize)

    d = cmds.add_parser("detokenize", parents=[common], formatter_class=fmt, help="token ids -> text")
    d.add_argument("ids", help="comma-separated token ids")
    d.set_defaults(func=_detokenize)

    i = cmds.add_parser("info", parents=[common], formatter_class=fmt, help="model and server limits")
    i.set_defaults(func=_info)

    h = cmds.add_parser("health", parents=[common], formatter_class=fmt, help="health check (exit 0 when SERVING)")
    h.add_argument("--service", default="", help="service name ('' = the whole server)")
    h.set_defaults(func=_health)


def _channel(args):
    import grpc

    if args.tls_ca or args.tls:
        roots = Path(args.tls_ca).read_bytes() if args.tls_ca else None
        return grpc.secure_channel(args.server, grpc.ssl_channel_credentials(root_certificates=roots))
    return grpc.insecure_channel(args.server)


def _metadata(args):
    if not args.auth_token_file:
        return None
    from server.auth import read_token_file

    return (("authorization", f"Bearer {read_token_file(args.auth_token_file)}"),)


def _call(args, fn):
    import grpc

    from server import jaxinfer_pb2_grpc

    with _channel(args) as channel:
        try:
            return fn(jaxinfer_pb2_grpc.InferenceStub(channel), dict(metadata=_metadata(args), timeout=args.timeout))
        except grpc.RpcError as e:
            print(f"jaxinfer client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1


def _read_prompt(args) -> str:
    if args.prompt_file:
        return Path(args.prompt_file).read_text()
    if args.prompt == "-":
        return sys.stdin.read()
    return args.prompt or ""


def _generate(args) -> int:
    from google.protobuf.json_format import MessageToDict

    from server import jaxinfer_pb2 as pb

    req = pb.GenerateRequest(
        request_id=args.request_id, min_tokens=args.min_tokens, stop=args.stop, stop_token_ids=args.stop_token_id,
        ignore_eos=args.ignore_eos, echo=args.echo, truncate_prompt=args.truncate_prompt,
    )
    if args.token_ids:
        req.prompt_token_ids.extend(int(x) for x in args.token_ids.split(","))
    elif args.chat:
        if args.system:
            req.messages.add(role="system", content=args.system)
        req.messages.add(role="user", content=_read_prompt(args))
    else:
        req.prompt = _read_prompt(args)
    for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "seed", "logprobs"):
        value = getattr(args, name)
        if value is not None:
            setattr(req, name, value)
    as_json = args.json or args.logprobs is not None

    def run(stub, kw):
        call = stub.Generate(req, **kw)
        last = None
        try:
            for resp in call:
                if as_json:
                    print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True)), flush=True)
                else:
                    sys.stdout.write(resp.text)
                    sys.stdout.flush()
                last = resp
        except KeyboardInterrupt:
            call.cancel()
            print("\n[cancelled]", file=sys.stderr)
            return 130
        if not as_json:
            sys.stdout.write("\n")
        if last is not None and last.finish_reason:
            u, t = last.usage, last.timings
            print(
                f"[{last.request_id}] finish={last.finish_reason} prompt_tokens={u.prompt_tokens} "
                f"completion_tokens={u.completion_tokens} queue={t.queue_seconds * 1e3:.1f}ms "
                f"ttft={t.ttft_seconds * 1e3:.1f}ms total={t.total_seconds * 1e3:.1f}ms",
                file=sys.stderr,
            )
        return 0

    return _call(args, run)


def _score(args) -> int:
    from server import jaxinfer_pb2 as pb

    def run(stub, kw):
        resp = stub.Score(pb.ScoreRequest(context=args.context, continuations=args.continuation), **kw)
        for text, s in zip(args.continuation, resp.scores):
            print(json.dumps({
                "continuation": text, "logprob": s.logprob, "is_greedy": s.is_greedy,
                "token_ids": list(s.token_ids), "token_logprobs": [round(x, 6) for x in s.token_logprobs],
            }))
        return 0

    return _call(args, run)


def _tokenize(args) -> int:
    from server import jaxinfer_pb2 as pb

    def run(stub, kw):
        req = pb.TokenizeRequest()
        if args.chat:
            req.messages.add(role="user", content=args.text)
        else:
            req.text = args.text
        if args.no_bos:
            req.add_bos = False
        print(",".join(str(i) for i in stub.Tokenize(req, **kw).token_ids))
        return 0

    return _call(args, run)


def _detokenize(args) -> int:
    from server import jaxinfer_pb2 as pb

    def run(stub, kw):
        ids = [int(x) for x in args.ids.split(",") if x.strip()]
        print(stub.Detokenize(pb.DetokenizeRequest(token_ids=ids), **kw).text)
        return 0

    return _call(args, run)


def _info(args) -> int:
    from google.protobuf.json_format import MessageToDict

    from server import jaxinfer_pb2 as pb

    def run(stub, kw):
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), **kw)
        print(json.dumps(MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True), indent=2))
        return 0

    return _call(args, run)


def _health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(args) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout or 5.0
            )
        except grpc.RpcError as e:
            print(f"jaxinfer client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1
