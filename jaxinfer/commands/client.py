"""``jaxinfer client``: talk to a running ``jaxinfer serve`` (generate streams to the terminal)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from jaxinfer.client import DEFAULT_ADDRESS, OPTIONAL_FIELDS, InferenceClient, generate_request
from jaxinfer.commands.common import HelpFormatter, add_command


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    c = common.add_argument_group("connection")
    c.add_argument("--server", default=DEFAULT_ADDRESS, help="HOST:PORT of the server")
    c.add_argument("--auth-token-file", help="file holding the bearer token")
    c.add_argument("--tls-ca", help="PEM root certificate(s): connect over TLS")
    c.add_argument("--tls", action="store_true", help="connect over TLS with the system roots")
    c.add_argument("--timeout", type=float, help="deadline of the call in seconds")

    p = add_command(sub, "client", help="call a jaxinfer server", description="Call a running jaxinfer gRPC server.",
                    example="jaxinfer client generate 'The capital of France is' --max-tokens 16")
    cmds = p.add_subparsers(dest="client_command", metavar="CALL", required=True)

    def call(name: str, help: str, example: str) -> argparse.ArgumentParser:
        return cmds.add_parser(name, parents=[common], formatter_class=HelpFormatter, help=help, description=help,
                               epilog=f"example:\n  jaxinfer client {example}\n")

    g = call("generate", "stream a generation to stdout", "generate 'Hello' --max-tokens 16 --stop .")
    g.add_argument("prompt", nargs="?", help="prompt text (or --prompt-file / stdin with '-')")
    g.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    g.add_argument("--system", help="system message (with --chat)")
    g.add_argument("--token-ids", help="comma-separated prompt token ids instead of text")
    g.add_argument("--max-tokens", type=int, help="tokens to generate (unset: the server's default)")
    g.add_argument("--min-tokens", type=int, default=0, help="stop conditions are ignored until this many tokens")
    g.add_argument("--temperature", type=float, help="unset: 0 (greedy)")
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

    s = call("score", "log p(continuation | context)", "score --context 'The capital of France is' --continuation ' Paris'")
    s.add_argument("--context", required=True)
    s.add_argument("--continuation", action="append", required=True, help="repeatable")
    s.set_defaults(func=_score)

    t = call("tokenize", "text -> token ids", "tokenize 'Hello world'")
    t.add_argument("text")
    t.add_argument("--chat", action="store_true", help="render the text as a user message first")
    t.add_argument("--no-bos", action="store_true")
    t.set_defaults(func=_tokenize)

    d = call("detokenize", "token ids -> text", "detokenize 19556,905")
    d.add_argument("ids", help="comma-separated token ids")
    d.set_defaults(func=_detokenize)

    i = call("info", "model and server limits", "info --server 127.0.0.1:50051")
    i.set_defaults(func=_info)

    h = call("health", "health check (exit 0 when SERVING)", "health --service jaxinfer.v1.Inference")
    h.add_argument("--service", default="", help="service name ('' = the whole server)")
    h.set_defaults(func=_health)


def _run(args, fn) -> int:
    """fn(client) -> exit code, with a gRPC error reported as `jaxinfer client: CODE: details` (exit 1)."""
    with InferenceClient.connect(args.server, auth_token_file=args.auth_token_file, tls_ca_file=args.tls_ca,
                                 tls=args.tls, timeout=args.timeout) as client:
        try:
            return fn(client)
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
    fields = {name: getattr(args, name) for name in OPTIONAL_FIELDS}
    common = dict(request_id=args.request_id, min_tokens=args.min_tokens, stop=args.stop,
                  stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos, echo=args.echo,
                  truncate_prompt=args.truncate_prompt, **fields)
    if args.token_ids:
        req = generate_request(prompt_token_ids=[int(x) for x in args.token_ids.split(",")], **common)
    elif args.chat:
        messages = ([("system", args.system)] if args.system else []) + [("user", _read_prompt(args))]
        req = generate_request(messages=messages, **common)
    else:
        req = generate_request(_read_prompt(args), **common)
    as_json = args.json or args.logprobs is not None

    def run(client: InferenceClient) -> int:
        call = client.generate(req)
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

    return _run(args, run)


def _score(args) -> int:
    def run(client: InferenceClient) -> int:
        resp = client.score(args.context, args.continuation)
        for text, s in zip(args.continuation, resp.scores):
            print(json.dumps({
                "continuation": text, "logprob": s.logprob, "is_greedy": s.is_greedy,
                "token_ids": list(s.token_ids), "token_logprobs": [round(x, 6) for x in s.token_logprobs],
            }))
        return 0

    return _run(args, run)


def _tokenize(args) -> int:
    def run(client: InferenceClient) -> int:
        ids = client.tokenize("" if args.chat else args.text, messages=[("user", args.text)] if args.chat else (),
                              add_bos=False if args.no_bos else None)
        print(",".join(str(i) for i in ids))
        return 0

    return _run(args, run)


def _detokenize(args) -> int:
    def run(client: InferenceClient) -> int:
        print(client.detokenize([int(x) for x in args.ids.split(",") if x.strip()]))
        return 0

    return _run(args, run)


def _info(args) -> int:
    def run(client: InferenceClient) -> int:
        info = client.model_info(timeout=args.timeout)
        print(json.dumps(MessageToDict(info, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True), indent=2))
        return 0

    return _run(args, run)


def _health(args) -> int:
    def run(client: InferenceClient) -> int:
        status = client.health(args.service, timeout=args.timeout or 5.0)
        print(status)
        return 0 if status == "SERVING" else 1

    return _run(args, run)
