//! Invocation records, written in batches: what the record writer has
//! queued goes in one transaction, one multi-row `INSERT` and one pruning
//! per function, instead of a transaction per record. A single record is a
//! batch of one.

use std::collections::{HashMap, HashSet};

use tokio_postgres::types::Json;

use super::{
    BackendError, InvocationRecord, PgStore, StoreError, i64_of, json, pool_error, postgres,
};

/// A record's function: (tenant, name).
type FunctionKey = (String, String);

impl PgStore {
    /// [`MetaStore::record_invocation`](super::MetaStore::record_invocation):
    /// a batch of one, failing with the database's own error.
    pub(super) fn record_one(&self, record: &InvocationRecord) -> Result<u64, StoreError> {
        let batch = vec![record.clone()];
        let retention = i64_of(self.inner.retention as u64);
        self.run(move |pool| write_batch(pool, batch, retention))?
            .pop()
            .unwrap_or_else(
                || Err(BackendError::Task("a batch of one had no answer".into()).into()),
            )
    }

    /// [`MetaStore::record_invocations`](super::MetaStore::record_invocations)
    /// in one transaction; when the transaction fails, every record of the
    /// batch fails with it.
    pub(super) fn record_batch(
        &self,
        records: &[InvocationRecord],
    ) -> Vec<Result<u64, StoreError>> {
        let size = records.len();
        let batch = records.to_vec();
        let retention = i64_of(self.inner.retention as u64);
        match self.run(move |pool| write_batch(pool, batch, retention)) {
            Ok(answers) => answers,
            Err(error) => {
                let (message, unavailable) = (error.to_string(), error.is_unavailable());
                (0..size)
                    .map(|_| {
                        Err(BackendError::Batch {
                            size,
                            message: message.clone(),
                            unavailable,
                        }
                        .into())
                    })
                    .collect()
            }
        }
    }
}

async fn write_batch(
    pool: deadpool_postgres::Pool,
    batch: Vec<InvocationRecord>,
    retention: i64,
) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
    let mut client = pool.get().await.map_err(pool_error)?;
    let tx = client.transaction().await.map_err(postgres)?;
    // Records are history, not state: their commit does not wait for the
    // WAL to reach the disk (a database crash may lose the last moments of
    // them, as sled's periodic flush may), which would otherwise bound the
    // writer to one disk flush per batch. Functions, keys and jobs keep
    // synchronous commits.
    tx.batch_execute("SET LOCAL synchronous_commit = off")
        .await
        .map_err(postgres)?;
    // The functions' rows, locked as in a single write (so each pruning
    // sees every record of its function), in one order, so that writers on
    // several hosts never wait on each other in a cycle.
    let mut names: Vec<FunctionKey> = batch
        .iter()
        .map(|r| (r.tenant.clone(), r.function.clone()))
        .collect();
    names.sort();
    names.dedup();
    let (tenants, functions): (Vec<String>, Vec<String>) = names.into_iter().unzip();
    let incarnations: HashMap<FunctionKey, i64> = tx
        .query(
            "SELECT f.tenant, f.name, f.incarnation
             FROM functions f
             JOIN unnest($1::TEXT[], $2::TEXT[]) AS w (tenant, name)
               ON f.tenant = w.tenant AND f.name = w.name
             ORDER BY f.tenant COLLATE \"C\", f.name COLLATE \"C\"
             FOR NO KEY UPDATE OF f",
            &[&tenants, &functions],
        )
        .await
        .map_err(postgres)?
        .iter()
        .map(|row| {
            Ok((
                (
                    row.try_get(0).map_err(postgres)?,
                    row.try_get(1).map_err(postgres)?,
                ),
                row.try_get(2).map_err(postgres)?,
            ))
        })
        .collect::<Result<_, StoreError>>()?;
    let incarnation = |r: &InvocationRecord| {
        incarnations
            .get(&(r.tenant.clone(), r.function.clone()))
            .copied()
    };
    let missing = |r: &InvocationRecord| {
        Err(StoreError::Missing(format!(
            "function {}/{}",
            r.tenant, r.function
        )))
    };
    if retention == 0 {
        // Nothing is kept: each record counts as pruned at once.
        return Ok(batch
            .iter()
            .map(|r| incarnation(r).map_or_else(|| missing(r), |_| Ok(1)))
            .collect());
    }

    let kept: Vec<(&InvocationRecord, i64)> = batch
        .iter()
        .filter_map(|r| incarnation(r).map(|i| (r, i)))
        .collect();
    let column = |f: fn(&(&InvocationRecord, i64)) -> String| -> Vec<String> {
        kept.iter().map(f).collect()
    };
    let (tenant_col, function_col, id_col) = (
        column(|(r, _)| r.tenant.clone()),
        column(|(r, _)| r.function.clone()),
        column(|(r, _)| r.id.clone()),
    );
    let incarnation_col: Vec<i64> = kept.iter().map(|(_, i)| *i).collect();
    let record_col: Vec<Json<&InvocationRecord>> = kept.iter().map(|(r, _)| Json(*r)).collect();
    // In the batch's order, so that `seq` keeps the order calls finished.
    let inserted: HashSet<String> = tx
        .query(
            "INSERT INTO invocations (tenant, function, incarnation, id, record)
             SELECT tenant, function, incarnation, id, record
             FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::JSONB[])
                 WITH ORDINALITY AS r (tenant, function, incarnation, id, record, n)
             ORDER BY n
             ON CONFLICT (tenant, id) DO NOTHING
             RETURNING id",
            &[
                &tenant_col,
                &function_col,
                &incarnation_col,
                &id_col,
                &record_col,
            ],
        )
        .await
        .map_err(postgres)?
        .iter()
        .map(|row| row.try_get(0).map_err(postgres))
        .collect::<Result<_, StoreError>>()?;

    // Ids are unique, so one already there is a retried write: fine if it
    // is the same record. Asked before pruning, which may remove it.
    let mut retried = vec![false; batch.len()];
    for (at, record) in batch.iter().enumerate() {
        if incarnation(record).is_none() || inserted.contains(&record.id) {
            continue;
        }
        let existing = tx
            .query_opt(
                "SELECT record FROM invocations WHERE tenant = $1 AND id = $2",
                &[&record.tenant, &record.id],
            )
            .await
            .map_err(postgres)?;
        let same = match &existing {
            Some(row) => json::<InvocationRecord>(row, 0)? == *record,
            None => false,
        };
        retried[at] = same;
    }

    // Everything older than the newest `retention` records of each
    // function goes: its count says how many, its floor where they start
    // (migration V3); what went is counted on the function's last record.
    let mut added: Vec<(FunctionKey, i64, i64)> = Vec::new();
    for (r, incarnation) in &kept {
        if !inserted.contains(&r.id) {
            continue;
        }
        let key = (r.tenant.clone(), r.function.clone());
        match added.iter_mut().find(|(k, _, _)| *k == key) {
            Some((_, _, n)) => *n += 1,
            None => added.push((key, *incarnation, 1)),
        }
    }
    let mut pruned: HashMap<FunctionKey, u64> = HashMap::new();
    for ((tenant, function), incarnation, n) in added {
        let row = tx
            .query_one(
                "INSERT INTO record_counts (tenant, function, incarnation, kept, pruned_to)
                 VALUES ($1, $2, $3, $4, 0)
                 ON CONFLICT (tenant, function, incarnation)
                 DO UPDATE SET kept = record_counts.kept + EXCLUDED.kept
                 RETURNING kept, pruned_to",
                &[&tenant, &function, &incarnation, &n],
            )
            .await
            .map_err(postgres)?;
        let (kept_now, floor): (i64, i64) = (
            row.try_get(0).map_err(postgres)?,
            row.try_get(1).map_err(postgres)?,
        );
        let excess = kept_now - retention;
        let mut removed = 0u64;
        if excess > 0 {
            let row = tx
                .query_one(
                    "WITH gone AS (
                         DELETE FROM invocations WHERE seq IN (
                             SELECT seq FROM invocations
                             WHERE tenant = $1 AND function = $2 AND incarnation = $3
                               AND seq > $4
                             ORDER BY seq LIMIT $5)
                         RETURNING seq)
                     UPDATE record_counts
                     SET kept = kept - (SELECT count(*) FROM gone),
                         pruned_to = coalesce((SELECT max(seq) FROM gone), pruned_to)
                     WHERE tenant = $1 AND function = $2 AND incarnation = $3
                     RETURNING (SELECT count(*) FROM gone)",
                    &[&tenant, &function, &incarnation, &floor, &excess],
                )
                .await
                .map_err(postgres)?;
            removed = u64::try_from(row.try_get::<_, i64>(0).map_err(postgres)?).unwrap_or(0);
        }
        pruned.insert((tenant, function), removed);
    }

    let mut answers = Vec::with_capacity(batch.len());
    for (at, record) in batch.iter().enumerate() {
        if incarnation(record).is_none() {
            answers.push(missing(record));
            continue;
        }
        if !inserted.contains(&record.id) {
            answers.push(if retried[at] {
                Ok(0)
            } else {
                Err(StoreError::Conflict(format!("invocation {:?}", record.id)))
            });
            continue;
        }
        let key = (record.tenant.clone(), record.function.clone());
        let last_of_function = !batch[at + 1..]
            .iter()
            .any(|later| later.tenant == key.0 && later.function == key.1);
        answers.push(Ok(if last_of_function {
            pruned.get(&key).copied().unwrap_or(0)
        } else {
            0
        }));
    }
    tx.commit().await.map_err(postgres)?;
    Ok(answers)
}
