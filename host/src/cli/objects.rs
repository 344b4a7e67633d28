//! The API's objects as the client reads them: the server's own wire types
//! (`gust_host::wire`, docs/api.md "Objects"), so the two cannot drift.

pub(crate) use gust_host::wire::{
    CreatedTenant, Function, FunctionList, Invocation, InvocationList, KeyList, NewKey, TenantList,
};
