//! The embedded `MetaStore`.
