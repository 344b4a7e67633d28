//! Host bindings generated from `wit/` (the `gust:function/guest` world).

#![allow(missing_docs, unreachable_pub)]

wasmtime::component::bindgen!({
    path: "../wit",
    world: "gust:function/guest",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "gust:gpu/tensors.tensor": crate::gpu::GpuTensor,
        "gust:gpu/models.model": crate::gpu::GpuModel,
        "wasi:nn/tensor.tensor": crate::nn::NnTensor,
        "wasi:nn/graph.graph": crate::nn::NnGraph,
        "wasi:nn/inference.graph-execution-context": crate::nn::NnContext,
        "wasi:nn/errors.error": crate::nn::NnError,
    },
});
