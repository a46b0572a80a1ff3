//! The copies of a user's map: METADATA (with `shared_map = "metadata"`, what every instance
//! serves) and the local sled state. Read and merged before a job adds to the map; written
//! where a copy lacks the result.

use super::report::{Conflict, Stored, Warning};
use super::store::Store;
use super::MigrateError;
use crate::config::{Config, SharedMap};
use crate::state::StateStore;
use crate::uidl::map::UidlMap;

/// The state store, or why it cannot be opened (a running `popbridge serve` holds it: then
/// the map goes to METADATA only; every instance reads the head in METADATA at each login and
/// fetches the new map when it differs from its cached copy).
pub(super) fn open_state(config: &Config) -> Result<StateStore, Warning> {
    StateStore::open(&config.state.dir).map_err(Warning::StateNotUpdated)
}

/// How the v2 state layout named a user of the backend `to` logging in as `login`.
pub(super) fn v2_user(to: &str, login: &str) -> String {
    format!("{}{login}", crate::state::state_prefix(to))
}

/// Whether maps go to METADATA for this store.
pub(super) fn shared(config: &Config, store: &Store) -> bool {
    config.migration.shared_map == SharedMap::Metadata && store.has_metadata
}

/// The copies of the map this user already has (only for the folder's UIDVALIDITY), and
/// their merge: METADATA's mappings first (with `shared`, it is what every instance serves),
/// then the local sled copy's where they do not contradict it. A contradiction keeps
/// METADATA's mapping and is reported.
pub(super) struct Existing {
    sled: Option<UidlMap>,
    metadata: Option<UidlMap>,
    pub merged: UidlMap,
    pub conflicts: Vec<Conflict>,
}

impl Existing {
    /// Whether `map` must be written: a copy that should hold it does not.
    pub fn must_store(&self, map: &UidlMap, shared: bool, state: bool) -> bool {
        (shared && self.metadata.as_ref() != Some(map))
            || (state && self.sled.as_ref() != Some(map))
    }
}

pub(super) async fn existing_map(
    state: Option<&StateStore>,
    store: &mut Store,
    shared: bool,
) -> Result<Existing, MigrateError> {
    let uv = store.uid_validity;
    if let Some(s) = state {
        if s.uidl_map_head(&store.key).is_none() {
            s.adopt_v2_uidl_map(&store.key, &store.v2_user, &store.mailbox);
        }
    }
    let sled = state
        .and_then(|s| s.uidl_map(&store.key))
        .map(|(_, m)| m)
        .filter(|m| m.uid_validity() == uv);
    let metadata = if shared {
        store
            .read_map()
            .await?
            .map(|(_, m)| m)
            .filter(|m| m.uid_validity() == uv)
    } else {
        None
    };
    let (merged, conflicts) = merge(uv, metadata.as_ref(), sled.as_ref());
    Ok(Existing {
        sled,
        metadata,
        merged,
        conflicts,
    })
}

/// METADATA's mappings, then the local copy's where they do not contradict them; each
/// contradiction is reported.
fn merge(uv: u32, metadata: Option<&UidlMap>, sled: Option<&UidlMap>) -> (UidlMap, Vec<Conflict>) {
    let mut merged = metadata
        .or(sled)
        .cloned()
        .unwrap_or_else(|| UidlMap::new(uv));
    let mut conflicts = Vec::new();
    if let (Some(_), Some(local)) = (metadata, sled) {
        for (uid, uidl) in local.iter() {
            if let Err(error) = merged.insert(uid, uidl) {
                conflicts.push(Conflict::LocalCopy {
                    uid,
                    uidl: uidl.to_owned(),
                    error,
                });
            }
        }
    }
    (merged, conflicts)
}

/// Writes the map where it goes; errors when it can go nowhere. METADATA first (a new
/// generation), then the local cache with the same head, so an instance on this state
/// directory does not fetch it again. Without METADATA where it should be, a warning about
/// `login`.
pub(super) async fn store_map(
    config: &Config,
    state: Option<&StateStore>,
    store: &mut Store,
    login: &str,
    map: &UidlMap,
    warnings: &mut Vec<Warning>,
) -> Result<Stored, MigrateError> {
    let shared = shared(config, store);
    let (mut head, text) = map.to_local()?;
    if shared {
        head = store
            .write_map(map, config.migration.metadata_chunk_bytes)
            .await?;
    }
    if let Some(s) = state {
        s.store_uidl_map(&store.key, &head, &text)
            .map_err(MigrateError::State)?;
    }
    if !shared && state.is_none() {
        return Err(MigrateError::NowhereToStore);
    }
    if !shared && config.migration.shared_map == SharedMap::Metadata {
        warnings.push(Warning::NoMetadata {
            login: login.to_owned(),
        });
    }
    Ok(Stored::Written {
        metadata: shared,
        sled: state.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both copies count: nothing either holds is lost, METADATA wins a contradiction, and
    /// the contradiction is reported; a copy that lacks the result must be written.
    #[test]
    fn existing_copies_are_merged_without_overwriting() {
        let map = |pairs: &[(u32, &str)]| {
            let mut m = UidlMap::new(7);
            for (u, l) in pairs {
                m.insert(*u, l).unwrap();
            }
            m
        };
        let meta = map(&[(1, "A"), (2, "B")]);
        let sled = map(&[(2, "B"), (3, "C"), (4, "A"), (1, "X")]);
        let (merged, conflicts) = merge(7, Some(&meta), Some(&sled));
        assert_eq!(merged, map(&[(1, "A"), (2, "B"), (3, "C")]));
        assert_eq!(conflicts.len(), 2, "{conflicts:?}");
        let text: Vec<String> = conflicts.iter().map(|c| c.to_string()).collect();
        assert!(
            text[0].contains("UID 1 / legacy UIDL X")
                && text[0].contains("METADATA's mapping kept")
        );
        assert!(text[1].contains("UID 4 / legacy UIDL A"));
        assert_eq!(merge(7, None, Some(&sled)), (sled.clone(), vec![]));
        assert_eq!(merge(7, Some(&meta), None), (meta.clone(), vec![]));
        assert_eq!(merge(7, None, None), (UidlMap::new(7), vec![]));
        let e = Existing {
            sled: Some(sled),
            metadata: Some(meta.clone()),
            merged: meta.clone(),
            conflicts: vec![],
        };
        assert!(e.must_store(&meta, false, true), "the sled copy differs");
        assert!(
            !e.must_store(&meta, true, false),
            "METADATA already holds it"
        );
    }
}
