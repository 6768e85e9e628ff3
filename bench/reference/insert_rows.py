"""The pipeline a user would write without tenantsync, for the throughput benchmark.

For each tenant: read its rows from Postgres with psycopg 3 (a server-side cursor, so memory
stays bounded), turn each row into a JSON-ready dict, and stream them to the tenant's dataset
with google-cloud-bigquery's ``Client.insert_rows_json`` in batches of 500, with an insertId per
row (key and update time) so a retry would not duplicate. Single process, single thread, as such
scripts usually are.

Settings (environment): SOURCE_DSN, SINK_URL (the BigQuery endpoint), BQ_PROJECT, TABLE,
TENANTS ("org_id:dataset,..."), BATCH (500). Prints one JSON line with what it did.
"""

import base64
import datetime
import decimal
import json
import os
import resource
import sys
import time
import uuid

import psycopg
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from psycopg.rows import dict_row


def to_json(v):
    """A Postgres value as insertAll wants it."""
    if isinstance(v, datetime.datetime):
        return v.isoformat()
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, (dict,)):
        return json.dumps(v)  # a BigQuery JSON column takes the document as a string
    if isinstance(v, list):
        return [to_json(x) for x in v if x is not None]
    if isinstance(v, (bytes, memoryview)):
        return base64.b64encode(bytes(v)).decode()
    if isinstance(v, uuid.UUID):
        return str(v)
    return v


def main():
    dsn = os.environ["SOURCE_DSN"]
    table = os.environ["TABLE"]
    project = os.environ["BQ_PROJECT"]
    batch = int(os.environ.get("BATCH", "500"))
    tenants = [t.split(":", 1) for t in os.environ["TENANTS"].split(",") if t]
    client = bigquery.Client(
        project=project,
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=os.environ["SINK_URL"]),
    )
    t0 = time.monotonic()
    rows_sent = 0
    requests = 0
    errors = 0
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        for org, dataset in tenants:
            dest = f"{project}.{dataset}.{table}"
            with conn.cursor(name=f"sync_{org}") as cur:
                cur.itersize = 5000
                cur.execute(
                    f"SELECT * FROM {table} WHERE organization_id = %s ORDER BY updated_at, id",
                    (int(org),),
                )
                rows, ids = [], []
                for r in cur:
                    rows.append({k: to_json(v) for k, v in r.items()})
                    ids.append(f"{r['id']}-{r['updated_at'].isoformat()}")
                    if len(rows) == batch:
                        errors += len(client.insert_rows_json(dest, rows, row_ids=ids))
                        requests += 1
                        rows_sent += len(rows)
                        rows, ids = [], []
                if rows:
                    errors += len(client.insert_rows_json(dest, rows, row_ids=ids))
                    requests += 1
                    rows_sent += len(rows)
            conn.commit()
    secs = time.monotonic() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "rows": rows_sent,
                "requests": requests,
                "row_errors": errors,
                "seconds": secs,
                "maxrss_kb": ru.ru_maxrss,
                "cpu_seconds": ru.ru_utime + ru.ru_stime,
                "python": sys.version.split()[0],
                "psycopg": psycopg.__version__,
                "google_cloud_bigquery": bigquery.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
