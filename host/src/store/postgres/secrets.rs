//! Tenant secrets, sealed (the database never holds a value in the
//! clear). A write locks its tenant's row, so that `max_secrets` holds
//! across hosts writing at once.

use super::{PgStore, SecretPut, SecretRecord, StoreError, i64_of, pool_error, postgres, u64_of};

impl PgStore {
    /// [`MetaStore::put_secret`](super::MetaStore::put_secret).
    pub(super) fn put_secret_row(
        &self,
        secret: &SecretRecord,
        max: u64,
    ) -> Result<SecretPut, StoreError> {
        let secret = secret.clone();
        self.run(move |pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(postgres)?;
            let tenant = tx
                .query_opt(
                    "SELECT 1 FROM tenants WHERE name = $1 FOR UPDATE",
                    &[&secret.tenant],
                )
                .await
                .map_err(postgres)?;
            if tenant.is_none() {
                return Err(StoreError::Missing(format!("tenant {:?}", secret.tenant)));
            }
            let updated = tx
                .execute(
                    "UPDATE secrets SET key_id = $3, sealed = $4, updated_at = $5
                      WHERE tenant = $1 AND name = $2",
                    &[
                        &secret.tenant,
                        &secret.name,
                        &secret.key_id,
                        &secret.sealed,
                        &i64_of(secret.updated_at),
                    ],
                )
                .await
                .map_err(postgres)?;
            let put = if updated > 0 {
                SecretPut::Replaced
            } else {
                let held: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM secrets WHERE tenant = $1",
                        &[&secret.tenant],
                    )
                    .await
                    .and_then(|row| row.try_get(0))
                    .map_err(postgres)?;
                if u64_of(held) >= max {
                    return Ok(SecretPut::AtLimit);
                }
                tx.execute(
                    "INSERT INTO secrets (tenant, name, key_id, sealed, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    &[
                        &secret.tenant,
                        &secret.name,
                        &secret.key_id,
                        &secret.sealed,
                        &i64_of(secret.created_at),
                        &i64_of(secret.updated_at),
                    ],
                )
                .await
                .map_err(postgres)?;
                SecretPut::Created
            };
            tx.commit().await.map_err(postgres)?;
            Ok(put)
        })
    }

    /// [`MetaStore::secrets`](super::MetaStore::secrets) of `tenant`, or
    /// every tenant's.
    pub(super) fn secret_rows(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<SecretRecord>, StoreError> {
        self.rows(
            r#"SELECT tenant, name, key_id, sealed, created_at, updated_at FROM secrets
                WHERE $1::TEXT IS NULL OR tenant = $1
                ORDER BY tenant COLLATE "C", name COLLATE "C""#,
            params![tenant.map(str::to_owned)],
            |row| {
                Ok(SecretRecord {
                    tenant: row.try_get(0).map_err(postgres)?,
                    name: row.try_get(1).map_err(postgres)?,
                    key_id: row.try_get(2).map_err(postgres)?,
                    sealed: row.try_get(3).map_err(postgres)?,
                    created_at: u64_of(row.try_get(4).map_err(postgres)?),
                    updated_at: u64_of(row.try_get(5).map_err(postgres)?),
                })
            },
        )
    }

    /// [`MetaStore::delete_secret`](super::MetaStore::delete_secret).
    pub(super) fn delete_secret_row(&self, tenant: &str, name: &str) -> Result<bool, StoreError> {
        let removed = self.execute(
            "DELETE FROM secrets WHERE tenant = $1 AND name = $2",
            params![tenant.to_owned(), name.to_owned()],
        )?;
        Ok(removed > 0)
    }
}
