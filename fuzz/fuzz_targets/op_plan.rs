//! The bridge's op validation (`Op::plan`): any op, with any parameters,
//! on operands of any dtype and shape, is lowered or refused with an error;
//! it never panics or overflows.
#![no_main]

use gust_gpu_bridge::{BinaryOp, DType, Op, Operand, ReduceOp, UnaryOp};
use libfuzzer_sys::fuzz_target;

/// Reads what the op needs from the fuzzer's bytes, zeros once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn i32(&mut self) -> i32 {
        self.u32().cast_signed()
    }
    fn f32(&mut self) -> f32 {
        f32::from_bits(self.u32())
    }
    fn dtype(&mut self) -> DType {
        DType::ALL[usize::from(self.u8()) % DType::ALL.len()]
    }
    fn list<T>(&mut self, item: impl Fn(&mut Self) -> T) -> Vec<T> {
        let n = usize::from(self.u8() % 8);
        (0..n).map(|_| item(self)).collect()
    }
    fn dim(&mut self) -> usize {
        // Mostly small, sometimes huge: overflow and size checks get tried.
        match self.u8() {
            255 => usize::MAX,
            254 => self.u32() as usize,
            n => usize::from(n % 9),
        }
    }
}

fn op(b: &mut Bytes<'_>) -> Op {
    let binary = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div];
    let unary = [
        UnaryOp::Relu,
        UnaryOp::Gelu,
        UnaryOp::Silu,
        UnaryOp::Tanh,
        UnaryOp::Exp,
    ];
    let reduce = [
        ReduceOp::Sum,
        ReduceOp::Mean,
        ReduceOp::Max,
        ReduceOp::ArgMax,
    ];
    match b.u8() % 17 {
        0 => Op::Matmul,
        1 => Op::Binary(binary[usize::from(b.u8()) % binary.len()]),
        2 => Op::Affine {
            scale: b.f32(),
            offset: b.f32(),
        },
        3 => Op::Unary(unary[usize::from(b.u8()) % unary.len()]),
        4 => Op::Softmax { dim: b.i32() },
        5 => Op::LayerNorm {
            eps: b.f32(),
            weight: b.u8() & 1 == 1,
            bias: b.u8() & 1 == 1,
        },
        6 => Op::RmsNorm {
            eps: b.f32(),
            weight: b.u8() & 1 == 1,
        },
        7 => Op::Reduce {
            op: reduce[usize::from(b.u8()) % reduce.len()],
            dim: b.i32(),
            keep_dim: b.u8() & 1 == 1,
        },
        8 => Op::Transpose {
            dim0: b.i32(),
            dim1: b.i32(),
        },
        9 => Op::Permute {
            dims: b.list(Bytes::u32),
        },
        10 => Op::Reshape {
            shape: b.list(|b| i64::from(b.i32())),
        },
        11 => Op::Slice {
            dim: b.i32(),
            start: b.u32(),
            len: b.u32(),
        },
        12 => Op::Concat { dim: b.i32() },
        13 => Op::Gather,
        14 => Op::Cast { to: b.dtype() },
        15 => Op::CausalAttention,
        _ => Op::Attention {
            heads: b.u32(),
            lengths: b.list(Bytes::u32),
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let op = op(&mut b);
    let count = usize::from(b.u8() % 5);
    let shapes: Vec<(DType, Vec<usize>)> = (0..count)
        .map(|_| (b.dtype(), b.list(Bytes::dim)))
        .collect();
    let operands: Vec<Operand<'_>> = shapes
        .iter()
        .map(|(dtype, shape)| Operand {
            dtype: *dtype,
            shape,
        })
        .collect();
    let _ = op.plan(&operands);
});
