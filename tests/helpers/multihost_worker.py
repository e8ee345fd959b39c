"""Run by test_multihost.py as one of two processes (2 virtual CPU devices each, gloo):

* restores a checkpoint onto the mesh over all 4 devices and reports, per weight, the global
  shape and the shards this process holds (shape, device, owning process);
* passes a fixed list of commands through :class:`jaxinfer.distributed.Channel` (process 0
  sends, process 1 receives) and reports what process 1 got.

    python -m tests.helpers.multihost_worker PROCESS_ID COORDINATOR_PORT CHECKPOINT_DIR
Prints one line ``RESULT {json}``.
"""

import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

from jaxinfer import distributed  # noqa: E402
from jaxinfer.distributed import Command, Op  # noqa: E402
from jaxinfer.engine.types import SamplingParams  # noqa: E402

# (floats that float32 holds exactly, so what arrives must equal what was sent)
COMMANDS = [
    Command(Op.PREFILL, row=3, start=64, last=False, tokens=tuple(range(7, 207)), pages=((5, 9, 2, 40, 41),),
            params=SamplingParams(temperature=0.75, top_k=40, top_p=0.875, min_p=0.0625, repetition_penalty=1.125,
                                  presence_penalty=-0.5, frequency_penalty=0.25, seed=2**62 + 12345, logprobs=5)),
    Command(Op.PREFILL, row=0, tokens=(1, 2, 3), params=SamplingParams(), pages=((7,),)),
    Command(Op.DECODE, rows=(0, 2, 3), pages=((7,), (1, 4), (5, 9, 2, 40, 41, 0)), steps=4, released=(1,)),
    Command(Op.SCORE, start=16, tokens=(9, 8, 7, 6, 5), targets=(8, 7, 6, 5, 4), pages=((3, 6),)),
    Command(Op.NOOP, released=(0, 3)),
    Command(Op.STOP),
]


def as_json(cmd: Command) -> dict:
    d = dataclasses.asdict(cmd)
    d["op"] = int(cmd.op)
    for key in ("tokens", "targets", "rows", "released"):
        d[key] = list(getattr(cmd, key))
    d["pages"] = [list(p) for p in cmd.pages]
    return d


def main() -> None:
    pid, port, ckpt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    distributed.initialize(f"127.0.0.1:{port}", 2, pid, heartbeat_timeout_s=10)
    import jax

    from jaxinfer.checkpoint import load_checkpoint
    from jaxinfer.model.weights import flatten
    from jaxinfer.sharding import make_mesh

    mesh = make_mesh(distributed.mesh_spec(None))  # every device on "model"
    params = flatten(load_checkpoint(ckpt, mesh=mesh).params)
    shards = {
        name: {
            "global": list(a.shape),
            "spec": str(a.sharding.spec),
            "local": [[list(s.data.shape), s.device.id, s.device.process_index] for s in a.addressable_shards],
        }
        for name, a in params.items()
    }
    channel = distributed.Channel(num_rows=4, max_payload=300)
    channel.warmup()
    received = []
    for cmd in COMMANDS:
        if pid == 0:
            channel.send(dataclasses.replace(cmd))
        else:
            received.append(as_json(channel.recv()))
    out = {"process": jax.process_index(), "devices": jax.device_count(), "shards": shards, "received": received,
           "sent": [as_json(dataclasses.replace(c, seq=i + 1)) for i, c in enumerate(COMMANDS)]}
    print("RESULT " + json.dumps(out), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
