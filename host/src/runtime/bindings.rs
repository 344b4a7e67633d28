//! Host bindings generated from `wit/` (the `gust:function/platform`
//! world: the `guest` world and the standard interfaces the host links
//! beside it).

#![allow(missing_docs, unreachable_pub)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "gust:function/platform",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "gust:gpu/tensors.tensor": crate::runtime::host::gpu::GpuTensor,
        "gust:gpu/models.model": crate::runtime::host::gpu::GpuModel,
        "wasi:nn/tensor.tensor": crate::runtime::host::nn::NnTensor,
        "wasi:nn/graph.graph": crate::runtime::host::nn::NnGraph,
        "wasi:nn/inference.graph-execution-context": crate::runtime::host::nn::NnContext,
        "wasi:nn/errors.error": crate::runtime::host::nn::NnError,
        "wasi:keyvalue/store.bucket": crate::runtime::host::kv::KvBucket,
    },
});
