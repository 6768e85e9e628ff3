"""A gRPC proxy in front of the local BigQuery's Storage Write port that injects faults.

Fault injection only (the happy path runs against the emulator itself): every call is
forwarded byte for byte, except the ones the plan names, which fail

  unavailable   with UNAVAILABLE before reaching the emulator,
  exhausted     with RESOURCE_EXHAUSTED before reaching the emulator,
  unauthenticated, denied
                with UNAUTHENTICATED / PERMISSION_DENIED (a key BigQuery stopped taking),
  drop_after    with UNAVAILABLE after the emulator did the work (its answer is dropped:
                what a connection lost on the way back looks like to the client).

Plans are cyclic lists per method, e.g. --appends pass,unavailable,pass,drop_after.
The first line printed is the port it listens on; counts of what it did are kept as JSON in
--stats after every call.

With --record FILE and --answer-tables T1,T2 it also stands in for BigQuery's CDC (which the
local BigQuery does not implement: it rejects `_CHANGE_TYPE` as an unknown field): an
AppendRows call on a stream of one of those tables is not forwarded; its rows are decoded with
the request's own descriptor and appended to FILE as one JSON line
({"stream": ..., "rows": [{column: value, ...}, ...]}), and the call is answered with success.
Faults apply to those calls as to the others (drop_after records the rows, then fails the
call: BigQuery applied them, the client did not hear so).

Run with the emulator's venv (.dev/venv/bin/python), which has grpcio and
google-cloud-bigquery-storage.
"""

import argparse
import itertools
import json
import threading
from concurrent import futures

import grpc

SERVICE = "/google.cloud.bigquery.storage.v1.BigQueryWrite/"
FAULTS = {
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "denied": grpc.StatusCode.PERMISSION_DENIED,
}
# Metadata the client sends that the emulator (or Google) reads.
FORWARDED = ("authorization", "x-goog-request-params")


def decode_append(data):
    """An AppendRowsRequest's stream and rows, decoded with its writer schema."""
    from google.cloud.bigquery_storage_v1.types import storage
    from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

    req = storage.AppendRowsRequest.pb().FromString(data)
    desc = req.proto_rows.writer_schema.proto_descriptor
    f = descriptor_pb2.FileDescriptorProto(name="row.proto", package="rec", syntax="proto2")
    f.message_type.add().CopyFrom(desc)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("rec." + desc.name))
    rows = []
    for raw in req.proto_rows.rows.serialized_rows:
        m = cls.FromString(raw)
        rows.append(json_format.MessageToDict(m, preserving_proto_field_name=True))
    return req.write_stream, rows


def success_answer():
    from google.cloud.bigquery_storage_v1.types import storage

    r = storage.AppendRowsResponse.pb()()
    r.append_result.SetInParent()
    return r.SerializeToString()


class Proxy(grpc.GenericRpcHandler):
    def __init__(self, target, plans, stats, record=None, answer_tables=()):
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", 32 << 20),
                ("grpc.max_receive_message_length", 32 << 20),
            ],
        )
        self.plans = {m: itertools.cycle(p) for m, p in plans.items() if p}
        self.stats_path = stats
        self.counts = {}
        self.lock = threading.Lock()
        self.record = record
        self.answer_tables = set(answer_tables)

    def answered(self, stream):
        parts = stream.split("/")
        return "tables" in parts and parts[parts.index("tables") + 1] in self.answer_tables

    def record_rows(self, stream, rows):
        with self.lock:
            with open(self.record, "a") as f:
                f.write(json.dumps({"stream": stream, "rows": rows}) + "\n")

    def next_fault(self, method):
        with self.lock:
            plan = self.plans.get(method)
            fault = next(plan) if plan else "pass"
            key = f"{method}:{fault}"
            self.counts[key] = self.counts.get(key, 0) + 1
            if self.stats_path:
                with open(self.stats_path + ".tmp", "w") as f:
                    json.dump(self.counts, f)
                import os

                os.replace(self.stats_path + ".tmp", self.stats_path)
        return fault

    def service(self, details):
        if not details.method.startswith(SERVICE):
            return None
        method = details.method[len(SERVICE) :]
        full = details.method
        metadata = [(k, v) for k, v in details.invocation_metadata if k in FORWARDED]
        if method == "AppendRows":

            def stream(requests, ctx):
                fault = self.next_fault(method)
                if fault in FAULTS:
                    ctx.abort(FAULTS[fault], f"injected {fault}")
                if self.record and self.answer_tables:
                    requests = list(requests)
                    decoded = [decode_append(r) for r in requests]
                    # A call carries one stream; the first request names it.
                    stream_name = decoded[0][0] if decoded else ""
                    if self.answered(stream_name):
                        for _, rows in decoded:
                            self.record_rows(stream_name, rows)
                        if fault == "drop_after":
                            ctx.abort(grpc.StatusCode.UNAVAILABLE, "injected drop after the append")
                        yield from (success_answer() for _ in requests)
                        return
                    requests = iter(requests)
                call = self.channel.stream_stream(full)
                answers = list(call(requests, metadata=metadata))
                if fault == "drop_after":
                    ctx.abort(grpc.StatusCode.UNAVAILABLE, "injected drop after the append")
                yield from answers

            return grpc.stream_stream_rpc_method_handler(stream)

        def unary(request, ctx):
            fault = self.next_fault(method)
            if fault in FAULTS:
                ctx.abort(FAULTS[fault], f"injected {fault}")
            try:
                answer = self.channel.unary_unary(full)(request, metadata=metadata)
            except grpc.RpcError as e:
                ctx.abort(e.code(), e.details())
            if fault == "drop_after":
                ctx.abort(grpc.StatusCode.UNAVAILABLE, "injected drop after the call")
            return answer

        return grpc.unary_unary_rpc_method_handler(unary)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--stats")
    p.add_argument("--record")
    p.add_argument("--answer-tables", default="")
    for m in ("appends", "creates", "finalizes", "commits"):
        p.add_argument(f"--{m}", default="")
    a = p.parse_args()
    split = lambda s: [x for x in s.split(",") if x]
    plans = {
        "AppendRows": split(a.appends),
        "CreateWriteStream": split(a.creates),
        "FinalizeWriteStream": split(a.finalizes),
        "BatchCommitWriteStreams": split(a.commits),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        handlers=[
            Proxy(a.target, plans, a.stats, a.record, [t for t in a.answer_tables.split(",") if t])
        ],
        options=[
            ("grpc.max_send_message_length", 32 << 20),
            ("grpc.max_receive_message_length", 32 << 20),
        ],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
