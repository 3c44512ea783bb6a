//! Index specs and load state: catalog-only changes (no broadcast). Delegators watch the
//! catalog record and rebuild what the change calls for.

use walden_proto::v1::{CollectionInfo, CollectionState, IndexSpec};
use walden_schema::{Schema, check_index};

use crate::{CoordError, Coordinator};

impl Coordinator {
    /// Changes the record of `name` (or of the collection the alias `name` names) with
    /// `change`, under the collection's lock, if it is created (not being created or dropped).
    pub(crate) async fn change(
        &self,
        name: &str,
        change: impl FnOnce(&mut CollectionInfo) -> Result<bool, CoordError>,
    ) -> Result<CollectionInfo, CoordError> {
        let name = &self.resolve(name).await?;
        let _guard = self.lock(name).await;
        let (kv, mut info) = self.load(name).await?;
        if info.state() != CollectionState::Created {
            return Err(CoordError::Busy(name.to_owned()));
        }
        if change(&mut info)? {
            self.save(&kv, &info).await?;
        }
        Ok(info)
    }

    /// Adds an index spec for a vector field. The same spec again changes nothing; another
    /// one on an indexed field is refused (drop the old one first).
    pub async fn create_index(
        &self,
        name: &str,
        spec: IndexSpec,
    ) -> Result<CollectionInfo, CoordError> {
        self.change(name, |info| {
            let schema = Schema::new(info.schema.clone().unwrap_or_default())?;
            let (spec, _) = check_index(&schema, &spec)?;
            match info.indexes.iter().find(|i| i.field == spec.field) {
                Some(same) if *same == spec => Ok(false),
                Some(other) => Err(CoordError::InvalidArgument(format!(
                    "field {:?} already has an index ({} {}); drop it first",
                    other.field,
                    walden_schema::index::index_type_name(other.index_type()),
                    walden_schema::index::metric_name(other.metric()),
                ))),
                None => {
                    info.indexes.push(spec);
                    Ok(true)
                }
            }
        })
        .await
    }

    /// Removes the index spec of `field` (searches of it become exact).
    pub async fn drop_index(&self, name: &str, field: &str) -> Result<CollectionInfo, CoordError> {
        self.change(name, |info| {
            let before = info.indexes.len();
            info.indexes.retain(|i| i.field != field);
            if info.indexes.len() == before {
                return Err(CoordError::InvalidArgument(format!(
                    "field {field:?} has no index"
                )));
            }
            Ok(true)
        })
        .await
    }

    /// Serves reads of the collection with `replicas` copies (0 reads as 1).
    pub async fn load_collection(
        &self,
        name: &str,
        replicas: u32,
    ) -> Result<CollectionInfo, CoordError> {
        let replicas = replicas.max(1);
        self.change(name, |info| {
            let changed = info.released || info.replicas.max(1) != replicas;
            info.released = false;
            info.replicas = replicas;
            Ok(changed)
        })
        .await
    }

    /// Stops serving reads of the collection.
    pub async fn release_collection(&self, name: &str) -> Result<CollectionInfo, CoordError> {
        self.change(name, |info| {
            let changed = !info.released;
            info.released = true;
            Ok(changed)
        })
        .await
    }
}
