//! Property tests of shape rules against the reference.

use gust_gpu_bridge::{BinaryOp, DType, Op, Operand, Work, broadcast};
use proptest::prelude::*;

use crate::reference::broadcast_shape;

fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![Just(1usize), 2usize..5], 0..5)
}

proptest! {
    #[test]
    fn broadcast_agrees_with_the_reference(a in shape(), b in shape()) {
        let ours = broadcast("add", &a, &b).ok().map(|(s, _, _)| s);
        prop_assert_eq!(ours, broadcast_shape(&a, &b));
    }

    #[test]
    fn broadcast_strides_address_inside_the_operand(a in shape(), b in shape()) {
        if let Ok((out, sa, sb)) = broadcast("add", &a, &b) {
            // The largest offset any output index reaches stays in bounds.
            let reach = |s: &[usize]| out.iter().zip(s).map(|(d, s)| d.saturating_sub(1) * s).sum::<usize>();
            prop_assert!(reach(&sa) < a.iter().product::<usize>().max(1));
            prop_assert!(reach(&sb) < b.iter().product::<usize>().max(1));
        }
    }

    #[test]
    fn binary_plans_have_the_broadcast_shape(a in shape(), b in shape()) {
        let plan = Op::Binary(BinaryOp::Add).plan(&[
            Operand { dtype: DType::F32, shape: &a },
            Operand { dtype: DType::F32, shape: &b },
        ]);
        match (plan, broadcast_shape(&a, &b)) {
            (Ok(p), Some(s)) => prop_assert_eq!(p.shape, s),
            (Err(e), None) => prop_assert_eq!(e.code, gust_gpu_bridge::ErrorCode::ShapeMismatch),
            (p, s) => prop_assert!(false, "plan {:?} vs reference {:?}", p, s),
        }
    }

    #[test]
    fn reshape_keeps_the_element_count(a in shape(), split in 0usize..5) {
        let n: usize = a.iter().product();
        let target: Vec<i64> = if split == 0 || n == 0 { vec![n as i64] } else { vec![-1, 1] };
        let plan = Op::Reshape { shape: target }.plan(&[Operand { dtype: DType::F32, shape: &a }]).unwrap();
        prop_assert_eq!(plan.shape.iter().product::<usize>(), n);
        prop_assert_eq!(plan.work, Work::Alias);
    }

    #[test]
    fn matmul_batch_offsets_stay_in_bounds(
        batch_a in prop::collection::vec(prop_oneof![Just(1usize), 2usize..4], 0..3),
        batch_b in prop::collection::vec(prop_oneof![Just(1usize), 2usize..4], 0..3),
        m in 1usize..4, k in 1usize..4, n in 1usize..4,
    ) {
        let mut a = batch_a.clone(); a.extend([m, k]);
        let mut b = batch_b.clone(); b.extend([k, n]);
        let plan = Op::Matmul.plan(&[Operand { dtype: DType::F32, shape: &a }, Operand { dtype: DType::F32, shape: &b }]);
        match (plan, broadcast_shape(&batch_a, &batch_b)) {
            (Ok(p), Some(batch)) => {
                let mut expected = batch.clone(); expected.extend([m, n]);
                prop_assert_eq!(&p.shape, &expected);
                if let Work::Kernel(gust_gpu_bridge::Kernel::Matmul { m: rows, k: inner, n: cols, lhs_offsets, rhs_offsets, .. }) = p.work {
                    prop_assert_eq!((inner, cols), (k, n));
                    // Either one matmul per batch, or (a shared right side)
                    // the batches folded into the rows of one.
                    prop_assert_eq!(lhs_offsets.len() * rows, batch.iter().product::<usize>() * m);
                    prop_assert!(lhs_offsets.iter().all(|&o| o + rows * k <= a.iter().product::<usize>()));
                    prop_assert!(rhs_offsets.iter().all(|&o| o + k * n <= b.iter().product::<usize>()));
                } else {
                    prop_assert!(false, "matmul lowers to a matmul kernel");
                }
            }
            (Err(_), None) => {}
            (p, s) => prop_assert!(false, "plan {:?} vs batch {:?}", p, s),
        }
    }
}
