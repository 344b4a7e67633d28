//! A thin, typed front for running ops from host code, so a model family
//! reads like the math it implements rather than like op plumbing.

use std::sync::Arc;

use crate::account::Account;
use crate::device::{Device, Tensor};
use crate::error::Result;
use crate::kernel::{BinaryOp, UnaryOp};
use crate::op::Op;

/// Runs ops on one device, charging one account.
#[derive(Clone, Copy)]
pub(crate) struct Graph<'a> {
    pub(crate) device: &'a Device,
    pub(crate) account: &'a Arc<Account>,
}

impl<'a> Graph<'a> {
    pub(crate) fn new(device: &'a Device, account: &'a Arc<Account>) -> Self {
        Self { device, account }
    }

    pub(crate) async fn op(&self, op: Op, operands: &[&Tensor]) -> Result<Tensor> {
        self.device.run(&op, operands, self.account).await
    }

    pub(crate) async fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.op(Op::Matmul, &[a, b]).await
    }

    pub(crate) async fn binary(&self, op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.op(Op::Binary(op), &[a, b]).await
    }

    pub(crate) async fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Add, a, b).await
    }

    /// `x @ weight + bias`, with `weight` already laid out `[in, out]`.
    pub(crate) async fn linear(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
    ) -> Result<Tensor> {
        let product = self.matmul(x, weight).await?;
        self.add(&product, bias).await
    }

    pub(crate) async fn unary(&self, op: UnaryOp, x: &Tensor) -> Result<Tensor> {
        self.op(Op::Unary(op), &[x]).await
    }

    pub(crate) async fn softmax(&self, x: &Tensor, dim: i32) -> Result<Tensor> {
        self.op(Op::Softmax { dim }, &[x]).await
    }

    pub(crate) async fn layer_norm(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        eps: f32,
    ) -> Result<Tensor> {
        self.op(
            Op::LayerNorm {
                eps,
                weight: true,
                bias: true,
            },
            &[x, weight, bias],
        )
        .await
    }

    pub(crate) async fn reshape(&self, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
        let shape = shape.iter().map(|&d| d as i64).collect();
        self.op(Op::Reshape { shape }, &[x]).await
    }

    pub(crate) async fn permute(&self, x: &Tensor, dims: &[u32]) -> Result<Tensor> {
        self.op(
            Op::Permute {
                dims: dims.to_vec(),
            },
            &[x],
        )
        .await
    }

    pub(crate) async fn slice(&self, x: &Tensor, dim: i32, start: u32, len: u32) -> Result<Tensor> {
        self.op(Op::Slice { dim, start, len }, &[x]).await
    }

    pub(crate) async fn gather(&self, table: &Tensor, indices: &Tensor) -> Result<Tensor> {
        self.op(Op::Gather, &[table, indices]).await
    }
}
