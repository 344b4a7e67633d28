//! Data movement on raw 2- and 4-byte elements (permute, slice, concat,
//! gather): exact, whatever the bits.

use gust_gpu_bridge::{DType, Kernel};

use super::on_every_backend;
use crate::harness::Rng;
use crate::reference::{self as r, Nd};

/// Random raw elements of `elem_size` bytes, as bytes and as exact f64s
/// (for the references).
fn raw_elements(rng: &mut Rng, n: usize, elem_size: usize) -> (Vec<u8>, Vec<f64>) {
    let words: Vec<u32> = (0..n)
        .map(|_| {
            if elem_size == 2 {
                rng.next_u32() & 0xFFFF
            } else {
                rng.next_u32()
            }
        })
        .collect();
    let values = words.iter().map(|&w| f64::from(w)).collect();
    (raw_bytes(&words, elem_size), values)
}

/// Exact f64 element values back to raw little-endian bytes.
fn raw_bytes_of(values: &[f64], elem_size: usize) -> Vec<u8> {
    let words: Vec<u32> = values.iter().map(|&v| v as u32).collect();
    raw_bytes(&words, elem_size)
}

fn raw_bytes(words: &[u32], elem_size: usize) -> Vec<u8> {
    words
        .iter()
        .flat_map(|w| w.to_le_bytes().into_iter().take(elem_size))
        .collect()
}

fn random_perm(rng: &mut Rng, n: usize) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        perm.swap(i, rng.below(i as u64 + 1) as usize);
    }
    perm
}

#[test]
fn permute_matches_reference() {
    on_every_backend("permute_matches_reference", |dev, rng| {
        let name = dev.description().name;
        let mut cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
            (vec![2, 3], vec![1, 0]),
            (vec![2, 3, 4], vec![2, 0, 1]),
            (vec![3, 4, 5], vec![0, 1, 2]),
            (vec![3, 5, 7], vec![2, 0, 1]),
            (vec![64, 130], vec![1, 0]),
            (vec![1, 5, 1, 7], vec![3, 2, 1, 0]),
            (vec![2, 3, 1, 5], vec![3, 1, 0, 2]),
            (vec![6, 1, 4], vec![1, 0, 2]),
            (vec![2, 1, 3, 1, 2, 1, 1, 3], vec![7, 6, 5, 4, 3, 2, 1, 0]),
            (vec![1, 1], vec![1, 0]),
            (vec![5, 3], vec![0, 1]),
        ];
        for _ in 0..6 {
            let shape = vec![2, 1, 3, 2, 2, 1, 2, 3];
            let perm = random_perm(rng, shape.len());
            cases.push((shape, perm));
        }
        for elem_size in [2, 4] {
            for (in_shape, perm) in &cases {
                let n: usize = in_shape.iter().product();
                let (bytes, values) = raw_elements(rng, n, elem_size);
                let kernel = Kernel::Permute {
                    elem_size,
                    in_shape: in_shape.clone(),
                    perm: perm.clone(),
                };
                let out = dev.run(&kernel, &[&bytes], n * elem_size);
                let expected = r::permute(&Nd::new(in_shape, values), perm);
                assert_eq!(
                    out,
                    raw_bytes_of(&expected.data, elem_size),
                    "permute {elem_size}B {in_shape:?} {perm:?} on {name}"
                );
            }
        }
    });
}

#[test]
fn slice_and_concat_match_reference() {
    on_every_backend("slice_and_concat_match_reference", |dev, rng| {
        let name = dev.description().name;
        for elem_size in [2, 4] {
            for (outer, in_len, start, len, inner) in [
                (1, 10, 0, 10, 1),
                (3, 10, 2, 5, 4),
                (2, 7, 6, 1, 3),
                (5, 100, 37, 50, 33),
                (3, 7, 2, 3, 5),
                (1, 9, 0, 9, 1),
                (5, 4, 3, 1, 1),
                (3, 3, 1, 1, 1),
            ] {
                let (bytes, values) = raw_elements(rng, outer * in_len * inner, elem_size);
                let kernel = Kernel::Slice {
                    elem_size,
                    outer,
                    in_len,
                    start,
                    len,
                    inner,
                };
                let out = dev.run(&kernel, &[&bytes], outer * len * inner * elem_size);
                let x = Nd::new(&[outer, in_len, inner], values);
                let expected = r::slice(&x, 1, start, len);
                assert_eq!(
                    out,
                    raw_bytes_of(&expected.data, elem_size),
                    "slice {elem_size}B {outer}x{in_len}x{inner} from {start} take {len} on {name}"
                );
            }
            for (outer, lens, inner) in [
                (1, vec![3, 4], 1),
                (2, vec![0, 3, 1], 5),
                (3, vec![5, 0], 2),
                (4, vec![1, 1, 1, 1, 1], 7),
                (3, vec![3, 0, 2, 5], 1),
                (2, vec![1, 1, 1], 3),
                (3, vec![0, 5, 0], 1),
                (4, vec![1, 2], 1),
                (1, vec![1], 1),
                (5, vec![1, 1], 1),
                (3, vec![2, 3, 1], 3),
            ] {
                let parts: Vec<(Vec<u8>, Vec<f64>)> = lens
                    .iter()
                    .map(|&l| raw_elements(rng, outer * l * inner, elem_size))
                    .collect();
                let total: usize = lens.iter().sum();
                let kernel = Kernel::Concat {
                    elem_size,
                    outer,
                    lens: lens.clone(),
                    inner,
                };
                let inputs: Vec<&[u8]> = parts.iter().map(|p| p.0.as_slice()).collect();
                let out = dev.run(&kernel, &inputs, outer * total * inner * elem_size);
                let nds: Vec<Nd> = parts
                    .iter()
                    .zip(&lens)
                    .map(|(p, &l)| Nd::new(&[outer, l, inner], p.1.clone()))
                    .collect();
                let expected = r::concat(&nds, 1);
                assert_eq!(
                    out,
                    raw_bytes_of(&expected.data, elem_size),
                    "concat {elem_size}B {lens:?} outer {outer} inner {inner} on {name}"
                );
            }
        }
    });
}

#[test]
fn gather_matches_reference() {
    on_every_backend("gather_matches_reference", |dev, rng| {
        let name = dev.description().name;
        let random: Vec<i64> = (0..1000).map(|_| rng.below(320) as i64 - 10).collect();
        // (index dtype, indices as their 32 bits read signed or unsigned,
        // table rows, row length)
        let cases: Vec<(DType, Vec<i64>, usize, usize)> = vec![
            (
                DType::I32,
                vec![0, 2, -1, 5, 1, i64::from(i32::MIN), 4, i64::from(i32::MAX)],
                5,
                3,
            ),
            (
                DType::I32,
                vec![2, -1, 0, 5, 1, 2, i64::from(i32::MIN)],
                4,
                3,
            ),
            (
                DType::U32,
                vec![4, 0, i64::from(u32::MAX), 5, 3, 1 << 31],
                5,
                3,
            ),
            (DType::U32, vec![3, 0, i64::from(u32::MAX), 4, 1], 4, 3),
            (DType::I32, random.clone(), 300, 64),
            (
                DType::U32,
                random.iter().map(|&v| v.rem_euclid(1 << 32)).collect(),
                300,
                1,
            ),
        ];
        for elem_size in [2, 4] {
            for (index_dtype, indices, rows, row_len) in &cases {
                let (table_bytes, table) = raw_elements(rng, rows * row_len, elem_size);
                let index_bytes: Vec<u8> = indices
                    .iter()
                    .flat_map(|&i| (i as u32).to_le_bytes())
                    .collect();
                let kernel = Kernel::Gather {
                    elem_size,
                    index_dtype: *index_dtype,
                    indices: indices.len(),
                    rows: *rows,
                    row_len: *row_len,
                };
                let out = dev.run(
                    &kernel,
                    &[&table_bytes, &index_bytes],
                    indices.len() * row_len * elem_size,
                );
                let table = Nd::new(&[*rows, *row_len], table);
                let expected = r::gather(&table, indices, &[indices.len()]);
                assert_eq!(
                    out,
                    raw_bytes_of(&expected.data, elem_size),
                    "gather {elem_size}B {index_dtype} rows {rows} on {name}"
                );
            }
        }
    });
}
