//! Tenants, API keys and policies.
