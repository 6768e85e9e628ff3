-- The read horizon: rows at or past it may still be joined by rows of transactions that are in
-- flight now (their cursor value is at least their transaction's start), so they wait for the
-- next run. Every open transaction counts, not only those that wrote already: one that has not
-- written yet may still write a row stamped with its start time. $1 is the clock-skew allowance
-- in milliseconds, covering applications that stamp rows from their own clock.
SELECT least(now(), coalesce(min(xact_start), 'infinity'::timestamptz))
       - make_interval(secs => $1 / 1000.0) AS horizon
FROM pg_stat_activity
WHERE datname = current_database()
  AND pid <> pg_backend_pid()
  AND xact_start IS NOT NULL
  AND backend_type = 'client backend'
