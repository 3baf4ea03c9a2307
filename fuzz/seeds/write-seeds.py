"""Writes the seed inputs of the fuzz targets into fuzz/corpus/TARGET.

Run once with the test environment's Python (it has the Python SDK and its
generated messages): `$STATEFABRIC_TEST_PYTHON fuzz/seeds/write-seeds.py`.
The corpora are kept in git; this only documents where the seeds came from.
"""

import hashlib
import json
import pathlib
import re

from statefabric.state.v1 import context_pb2 as ctx
from statefabric.state.v1 import events_pb2 as ev
from statefabric.state.v1 import locks_pb2 as lk
from statefabric.state.v1 import sessions_pb2 as ss
from statefabric.state.v1 import tasks_pb2 as tk

ROOT = pathlib.Path(__file__).resolve().parents[2]
CORPUS = ROOT / "fuzz" / "corpus"


def seed(target: str, data: bytes) -> None:
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)


for key in ["plan-1/PLAN/1/1", "s/CODE/2/3/undo", "s/a/b/1/2", "s//0/0"]:
    seed("task_key", key.encode())

builtin = (ROOT / "crates/saga/src/builtin.rs").read_text()
yaml = re.search(r'PLAN_CODE_CRITIQUE_YAML: &str = r#"(.*?)"#;', builtin, re.S).group(1)
seed("saga_definition", yaml.encode())
seed("saga_definition", json.dumps({
    "name": "two", "version": 1, "start": "A",
    "steps": {"A": {"agent": "a", "action": "x", "on_success": "B"},
              "B": {"agent": "b", "action": "y", "compensation": "none", "on_success": "DONE"}},
}).encode())

review = {
    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
    "request": {
        "uid": "abc-123", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE", "namespace": "agents", "userInfo": {},
        "object": {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "p", "annotations": {"statefabric.io/inject": "true"}},
                   "spec": {"containers": [{"name": "a", "image": "a",
                                            "env": [{"name": "X", "value": "1"}]}],
                            "volumes": [{"name": "v", "emptyDir": {}}]}},
    },
}
for choice in (0, 1):
    seed("admission_review", bytes([choice]) + json.dumps(review).encode())

vector = ctx.VersionVector(counters={"fuzzer": 1})
state_api = {
    0: ev.AppendEventsRequest(stream_id="order-1", stream_type="order",
                              events=[ev.NewEvent(event_type="created", data_json=b'{"a":1}')]),
    1: ev.ReadStreamRequest(stream_id="order-1"),
    5: ctx.GetContextRequest(document_id="doc-1"),
    6: ctx.GetContextsRequest(document_ids=["doc-1", "doc-2"]),
    7: ctx.PutContextRequest(document_id="doc-1", content_json=b'{"a":[1,2]}'),
    8: ctx.PatchContextRequest(document_id="doc-1", base=vector,
                               patch_json=b'[{"op":"add","path":"/a/-","value":3}]'),
    9: ctx.MergeContextRequest(document_id="set-1", merge_type=ctx.MERGE_TYPE_OR_SET,
                               ops=[ctx.CrdtOp(add_json=b'"x"')]),
    10: ctx.DeleteContextRequest(document_id="doc-1", base=vector),
    12: lk.AcquireRequest(name="lock-1", ttl_ms=1000),
    15: lk.InspectRequest(name="lock-1"),
    16: ss.PutSessionRequest(namespace="default", id="s-1", value=b"v"),
    17: ss.GetSessionRequest(namespace="default", id="s-1"),
    19: tk.StartSagaRequest(definition="plan-code-critique", data_json=b'{"task":"t"}'),
    22: tk.HeartbeatRequest(key="s/PLAN/1/1"),
    25: ctx.MergeContextRequest(document_id="n-1", merge_type=ctx.MERGE_TYPE_PN_COUNTER,
                                ops=[ctx.CrdtOp(increment=9223372036854775807)]),
}
for which, message in state_api.items():
    seed("state_api", bytes([which]) + message.SerializeToString())
