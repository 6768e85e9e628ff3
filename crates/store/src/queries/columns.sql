-- Columns of a source table with their types resolved through domains and arrays, so the
-- mapping sees the base type (`int8`, `timestamptz`, …) and whether the column is an array.
WITH cols AS (
    SELECT a.attnum, a.attname, a.atttypmod,
           format_type(a.atttypid, a.atttypmod) AS formatted,
           format_type(a.atttypid, NULL) AS sql_type,
           CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END AS base_oid
    FROM pg_attribute a
    JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
), resolved AS (
    SELECT c.*, b.typcategory = 'A' AND b.typelem <> 0 AS is_array,
           CASE WHEN b.typcategory = 'A' AND b.typelem <> 0 THEN
               (SELECT CASE WHEN e.typtype = 'd' THEN e.typbasetype ELSE e.oid END
                FROM pg_type e WHERE e.oid = b.typelem)
           ELSE b.oid END AS final_oid
    FROM cols c JOIN pg_type b ON b.oid = c.base_oid
)
SELECT r.attname::text AS name, r.formatted, r.sql_type, f.typname::text AS base_type,
       f.typtype::text AS typtype, r.is_array,
       CASE WHEN f.typname = 'numeric' AND r.atttypmod >= 4
            THEN ((r.atttypmod - 4) >> 16) & 65535 END AS numeric_precision,
       CASE WHEN f.typname = 'numeric' AND r.atttypmod >= 4
            THEN (r.atttypmod - 4) & 65535 END AS numeric_scale
FROM resolved r JOIN pg_type f ON f.oid = r.final_oid
ORDER BY r.attnum
