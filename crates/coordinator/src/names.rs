//! Names: aliases, renames and the schema's properties (catalog-only changes, no broadcast).
//!
//! An alias is a second name for a collection (`walden/coord/alias/{alias}` holds the
//! collection's name). Collection names and aliases share one namespace: each write checks, in
//! the same transaction, that the other kind does not hold the name. Every call that names a
//! collection takes an alias too, except DropCollection and RenameCollection, which want the
//! real name (as in Milvus). A collection with aliases cannot be dropped until they are.
//!
//! A rename moves the catalog record to the new name in one transaction, re-pointing its
//! aliases. The shards keep the name the collection was created with: readers of the catalog
//! find a collection by id (`find_by_id`), and reads name it by id as well as by name.

use std::collections::HashMap;

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::OwnedMutexGuard;
use tracing::info;
use walden_metastore_api::{Compare, KeyValue, Op, Txn, keys};
use walden_proto::v1::{Alias, CollectionInfo, CollectionState};

use crate::{CoordError, Coordinator, collection_key, validate_name};

impl Coordinator {
    /// The alias `name`, if it is one: the collection it names.
    pub(crate) async fn alias_target(
        &self,
        name: &str,
    ) -> Result<Option<(KeyValue, String)>, CoordError> {
        let Some(kv) = self.meta.get(&keys::alias(name)).await? else {
            return Ok(None);
        };
        let target = std::str::from_utf8(&kv.value)
            .map_err(|_| CoordError::Corrupt(kv.key.clone()))?
            .to_owned();
        Ok(Some((kv, target)))
    }

    /// The name of the collection `name` stands for: itself, or the collection an alias names
    /// (a name that is neither comes back as is, for the caller's NotFound).
    pub(crate) async fn resolve(&self, name: &str) -> Result<String, CoordError> {
        validate_name("collection", name)?;
        if self.meta.get(&collection_key(name)).await?.is_some() {
            return Ok(name.to_owned());
        }
        Ok(self
            .alias_target(name)
            .await?
            .map_or_else(|| name.to_owned(), |(_, t)| t))
    }

    /// Refuses `name` for a new collection or alias when an alias holds it.
    pub(crate) async fn check_not_alias(&self, name: &str) -> Result<(), CoordError> {
        match self.alias_target(name).await? {
            Some((_, target)) => Err(CoordError::NameTaken(format!(
                "{name:?} is an alias of collection {target:?}"
            ))),
            None => Ok(()),
        }
    }

    /// The aliases of `collection` (every alias when empty), sorted by alias.
    pub async fn list_aliases(&self, collection: &str) -> Result<Vec<Alias>, CoordError> {
        let mut out = Vec::new();
        for kv in self.meta.range(keys::ALIAS_PREFIX).await? {
            let alias = kv.key[keys::ALIAS_PREFIX.len()..].to_owned();
            let target =
                std::str::from_utf8(&kv.value).map_err(|_| CoordError::Corrupt(kv.key.clone()))?;
            if collection.is_empty() || target == collection {
                out.push(Alias {
                    alias,
                    collection: target.to_owned(),
                });
            }
        }
        out.sort_by(|a, b| a.alias.cmp(&b.alias));
        Ok(out)
    }

    /// Locks two names in a fixed order (no two tasks wait for each other).
    async fn lock_two(&self, a: &str, b: &str) -> (OwnedMutexGuard<()>, OwnedMutexGuard<()>) {
        let (first, second) = if a <= b { (a, b) } else { (b, a) };
        let g1 = self.lock(first).await;
        let g2 = self.lock(second).await;
        (g1, g2)
    }

    /// Points `alias` at `collection`: a new alias (`create`) or one that exists.
    async fn set_alias(
        &self,
        alias: &str,
        collection: &str,
        create: bool,
    ) -> Result<Alias, CoordError> {
        validate_name("alias", alias)?;
        validate_name("collection", collection)?;
        let _guards = self.lock_two(alias, collection).await;
        let record = match self.meta.get(&collection_key(collection)).await? {
            Some(kv) => kv,
            None => {
                return Err(match self.alias_target(collection).await? {
                    Some((_, t)) => CoordError::InvalidArgument(format!(
                        "{collection:?} is an alias (of {t:?}); an alias names a collection"
                    )),
                    None => CoordError::NotFound(collection.to_owned()),
                });
            }
        };
        let info = CollectionInfo::decode(record.value.as_ref())
            .map_err(|_| CoordError::Corrupt(record.key.clone()))?;
        if info.state() != CollectionState::Created {
            return Err(CoordError::Busy(collection.to_owned()));
        }
        if self.meta.get(&collection_key(alias)).await?.is_some() {
            return Err(CoordError::NameTaken(format!(
                "{alias:?} is a collection's name; an alias cannot take it"
            )));
        }
        let existing = self.alias_target(alias).await?;
        let alias_compare = match (&existing, create) {
            (None, true) => Compare::absent(keys::alias(alias)),
            (Some((_, t)), true) => {
                return Err(CoordError::NameTaken(format!(
                    "alias {alias:?} already names collection {t:?}"
                )));
            }
            (None, false) => return Err(CoordError::AliasNotFound(alias.to_owned())),
            (Some((kv, _)), false) => Compare::mod_revision(&kv.key, kv.mod_revision),
        };
        let resp = self
            .meta
            .txn(Txn {
                compare: vec![
                    Compare::mod_revision(&record.key, record.mod_revision),
                    Compare::absent(collection_key(alias)),
                    alias_compare,
                ],
                success: vec![Op::Put {
                    key: keys::alias(alias),
                    value: Bytes::from(collection.as_bytes().to_vec()),
                    lease: None,
                }],
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(CoordError::Busy(collection.to_owned()));
        }
        info!(alias, collection, create, "alias set");
        Ok(Alias {
            alias: alias.to_owned(),
            collection: collection.to_owned(),
        })
    }

    /// A new alias for a collection.
    pub async fn create_alias(&self, alias: &str, collection: &str) -> Result<Alias, CoordError> {
        self.set_alias(alias, collection, true).await
    }

    /// Points an existing alias at another collection.
    pub async fn alter_alias(&self, alias: &str, collection: &str) -> Result<Alias, CoordError> {
        self.set_alias(alias, collection, false).await
    }

    /// Removes an alias; returns what it named (an empty collection when there was no such
    /// alias: dropping one that does not exist succeeds, as in Milvus).
    pub async fn drop_alias(&self, alias: &str) -> Result<Alias, CoordError> {
        validate_name("alias", alias)?;
        let _guard = self.lock(alias).await;
        let Some((kv, target)) = self.alias_target(alias).await? else {
            return Ok(Alias {
                alias: alias.to_owned(),
                collection: String::new(),
            });
        };
        self.delete_at(&kv, alias).await?;
        info!(alias, collection = target, "alias dropped");
        Ok(Alias {
            alias: alias.to_owned(),
            collection: target,
        })
    }

    /// Renames a collection: its record moves to `new_name` and its aliases follow, in one
    /// transaction. Shards, segments and manifests are by id and stay as they are.
    pub async fn rename_collection(
        &self,
        name: &str,
        new_name: &str,
    ) -> Result<CollectionInfo, CoordError> {
        validate_name("collection", name)?;
        validate_name("collection", new_name)?;
        if name == new_name {
            return Err(CoordError::InvalidArgument(format!(
                "collection {name:?} already has that name"
            )));
        }
        let _guards = self.lock_two(name, new_name).await;
        let (kv, mut info) = match self.load(name).await {
            Err(CoordError::NotFound(_)) => {
                return Err(match self.alias_target(name).await? {
                    Some((_, t)) => CoordError::InvalidArgument(format!(
                        "{name:?} is an alias (of {t:?}); rename the collection by its name"
                    )),
                    None => CoordError::NotFound(name.to_owned()),
                });
            }
            r => r?,
        };
        if info.state() != CollectionState::Created || !info.pending_partition.is_empty() {
            return Err(CoordError::Busy(name.to_owned()));
        }
        if self.meta.get(&collection_key(new_name)).await?.is_some() {
            return Err(CoordError::Exists(new_name.to_owned()));
        }
        self.check_not_alias(new_name).await?;
        let mut compare = vec![
            Compare::mod_revision(&kv.key, kv.mod_revision),
            Compare::absent(collection_key(new_name)),
            Compare::absent(keys::alias(new_name)),
        ];
        info.name = new_name.to_owned();
        let mut success = vec![
            Op::Delete {
                key: kv.key.clone(),
            },
            Op::Put {
                key: collection_key(new_name),
                value: Bytes::from(info.encode_to_vec()),
                lease: None,
            },
        ];
        let aliases: HashMap<String, KeyValue> = self
            .meta
            .range(keys::ALIAS_PREFIX)
            .await?
            .into_iter()
            .filter(|a| a.value.as_ref() == name.as_bytes())
            .map(|a| (a.key.clone(), a))
            .collect();
        for (key, a) in &aliases {
            compare.push(Compare::mod_revision(key, a.mod_revision));
            success.push(Op::Put {
                key: key.clone(),
                value: Bytes::from(new_name.as_bytes().to_vec()),
                lease: None,
            });
        }
        let resp = self
            .meta
            .txn(Txn {
                compare,
                success,
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(CoordError::Busy(name.to_owned()));
        }
        info!(
            collection = name,
            new_name,
            collection_id = info.collection_id,
            aliases = aliases.len(),
            "collection renamed"
        );
        self.describe(new_name).await
    }

    /// Sets and removes keys of the schema's properties (opaque to Walden: front ends keep
    /// their own description of the collection there).
    pub async fn alter_properties(
        &self,
        name: &str,
        set: HashMap<String, Bytes>,
        delete: Vec<String>,
    ) -> Result<CollectionInfo, CoordError> {
        self.change(name, |info| {
            let props = &mut info.schema.get_or_insert_default().properties;
            let before = props.clone();
            for k in &delete {
                props.remove(k);
            }
            props.extend(set);
            Ok(*props != before)
        })
        .await
    }
}
