//! Float64 reference implementations, written independently of the
//! bridge's own shape code: plain multi-index loops.

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Nd {
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<f64>,
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = flat % shape[d];
        flat /= shape[d];
    }
    idx
}

impl Nd {
    pub(crate) fn new(shape: &[usize], data: Vec<f64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        Self {
            shape: shape.to_vec(),
            data,
        }
    }

    pub(crate) fn from_f32(shape: &[usize], data: &[f32]) -> Self {
        Self::new(shape, data.iter().map(|&v| f64::from(v)).collect())
    }

    fn at(&self, idx: &[usize]) -> f64 {
        let s = strides(&self.shape);
        self.data[idx.iter().zip(&s).map(|(i, s)| i * s).sum::<usize>()]
    }

    /// Value at `idx` of a broadcast result of rank `idx.len()`.
    fn at_broadcast(&self, idx: &[usize]) -> f64 {
        let offset = idx.len() - self.shape.len();
        let own: Vec<usize> = self
            .shape
            .iter()
            .enumerate()
            .map(|(d, &size)| if size == 1 { 0 } else { idx[d + offset] })
            .collect();
        self.at(&own)
    }
}

pub(crate) fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|d| {
            let x = if d + a.len() >= rank {
                a[d + a.len() - rank]
            } else {
                1
            };
            let y = if d + b.len() >= rank {
                b[d + b.len() - rank]
            } else {
                1
            };
            match (x, y) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

pub(crate) fn binary(a: &Nd, b: &Nd, f: impl Fn(f64, f64) -> f64) -> Nd {
    let shape = broadcast_shape(&a.shape, &b.shape).expect("broadcastable");
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| {
            let idx = unravel(i, &shape);
            f(a.at_broadcast(&idx), b.at_broadcast(&idx))
        })
        .collect();
    Nd::new(&shape, data)
}

pub(crate) fn map(x: &Nd, f: impl Fn(f64) -> f64) -> Nd {
    Nd::new(&x.shape, x.data.iter().map(|&v| f(v)).collect())
}

/// `0.5 v (1 + erf(v / sqrt 2))`, with `1 + erf(v / sqrt 2)` as
/// `erfc(-v / sqrt 2)` so that it keeps its relative accuracy for large
/// negative `v`, where the sum cancels even in f64.
pub(crate) fn gelu(v: f64) -> f64 {
    0.5 * v * libm::erfc(-v / std::f64::consts::SQRT_2)
}

pub(crate) fn matmul(a: &Nd, b: &Nd) -> Nd {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
    let batch = broadcast_shape(&a.shape[..ra - 2], &b.shape[..rb - 2]).expect("batch broadcast");
    let mut shape = batch.clone();
    shape.extend([m, n]);
    let total: usize = shape.iter().product();
    let mut data = vec![0.0; total];
    for (flat, slot) in data.iter_mut().enumerate() {
        let idx = unravel(flat, &shape);
        let (i, j) = (idx[idx.len() - 2], idx[idx.len() - 1]);
        let mut ia = idx.clone();
        let mut ib = idx.clone();
        let mut sum = 0.0;
        for p in 0..k {
            let len = ia.len();
            ia[len - 2] = i;
            ia[len - 1] = p;
            ib[len - 2] = p;
            ib[len - 1] = j;
            sum += a.at_broadcast(&ia) * b.at_broadcast(&ib);
        }
        *slot = sum;
    }
    Nd::new(&shape, data)
}

/// `x` viewed as `[outer, len, inner]` around `dim`.
fn around(x: &Nd, dim: usize) -> (usize, usize, usize) {
    let outer = x.shape[..dim].iter().product();
    let inner = x.shape[dim + 1..].iter().product();
    (outer, x.shape[dim], inner)
}

/// Apply `f` to every 1-D lane along `dim`, writing a lane of the same length.
pub(crate) fn along(x: &Nd, dim: usize, f: impl Fn(&[f64]) -> Vec<f64>) -> Nd {
    let mut out = x.clone();
    let (outer, len, inner) = around(x, dim);
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * len + j) * inner + i;
            let lane: Vec<f64> = (0..len).map(|j| x.data[at(j)]).collect();
            for (j, v) in f(&lane).into_iter().enumerate() {
                out.data[at(j)] = v;
            }
        }
    }
    out
}

pub(crate) fn softmax(x: &Nd, dim: usize) -> Nd {
    along(x, dim, |lane| {
        let max = lane.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = lane.iter().map(|v| (v - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|v| v / sum).collect()
    })
}

pub(crate) fn layer_norm(x: &Nd, w: Option<&[f64]>, b: Option<&[f64]>, eps: f64) -> Nd {
    let last = x.shape.len() - 1;
    along(x, last, |row| {
        let n = row.len() as f64;
        let mean = row.iter().sum::<f64>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        row.iter()
            .enumerate()
            .map(|(j, v)| {
                (v - mean) / (var + eps).sqrt() * w.map_or(1.0, |w| w[j]) + b.map_or(0.0, |b| b[j])
            })
            .collect()
    })
}

pub(crate) fn rms_norm(x: &Nd, w: Option<&[f64]>, eps: f64) -> Nd {
    let last = x.shape.len() - 1;
    along(x, last, |row| {
        let ms = row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64;
        row.iter()
            .enumerate()
            .map(|(j, v)| v / (ms + eps).sqrt() * w.map_or(1.0, |w| w[j]))
            .collect()
    })
}

pub(crate) fn reduce(x: &Nd, dim: usize, keep: bool, f: impl Fn(&[f64]) -> f64) -> Nd {
    let mut shape = x.shape.clone();
    shape[dim] = 1;
    let (outer, len, inner) = around(x, dim);
    let mut data = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let lane: Vec<f64> = (0..len)
                .map(|j| x.data[(o * len + j) * inner + i])
                .collect();
            data.push(f(&lane));
        }
    }
    if !keep {
        shape.remove(dim);
    }
    Nd::new(&shape, data)
}

pub(crate) fn argmax(lane: &[f64]) -> f64 {
    let mut best = 0;
    for (j, &v) in lane.iter().enumerate() {
        if v > lane[best] {
            best = j;
        }
    }
    best as f64
}

/// The maximum, NaN if any element is NaN (`ReduceOp::Max`).
pub(crate) fn max_nan(lane: &[f64]) -> f64 {
    lane.iter().fold(f64::NEG_INFINITY, |a, &v| {
        if a.is_nan() || v.is_nan() {
            f64::NAN
        } else {
            a.max(v)
        }
    })
}

/// Index of the first maximum, NaN counting as the maximum
/// (`ReduceOp::ArgMax`).
pub(crate) fn argmax_nan(lane: &[f64]) -> f64 {
    let mut best = 0;
    for (j, &v) in lane.iter().enumerate() {
        let b = lane[best];
        if (v.is_nan() && !b.is_nan()) || v > b {
            best = j;
        }
    }
    best as f64
}

pub(crate) fn permute(x: &Nd, perm: &[usize]) -> Nd {
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let n = x.data.len();
    let data = (0..n)
        .map(|flat| {
            let out_idx = unravel(flat, &shape);
            let mut in_idx = vec![0; perm.len()];
            for (d, &p) in perm.iter().enumerate() {
                in_idx[p] = out_idx[d];
            }
            x.at(&in_idx)
        })
        .collect();
    Nd::new(&shape, data)
}

pub(crate) fn slice(x: &Nd, dim: usize, start: usize, len: usize) -> Nd {
    let mut shape = x.shape.clone();
    shape[dim] = len;
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|flat| {
            let mut idx = unravel(flat, &shape);
            idx[dim] += start;
            x.at(&idx)
        })
        .collect();
    Nd::new(&shape, data)
}

pub(crate) fn concat(xs: &[Nd], dim: usize) -> Nd {
    let mut shape = xs[0].shape.clone();
    shape[dim] = xs.iter().map(|x| x.shape[dim]).sum();
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|flat| {
            let mut idx = unravel(flat, &shape);
            for x in xs {
                if idx[dim] < x.shape[dim] {
                    return x.at(&idx);
                }
                idx[dim] -= x.shape[dim];
            }
            unreachable!()
        })
        .collect();
    Nd::new(&shape, data)
}

pub(crate) fn gather(table: &Nd, indices: &[i64], index_shape: &[usize]) -> Nd {
    let row: usize = table.shape[1..].iter().product();
    let rows = table.shape[0] as i64;
    let mut data = Vec::new();
    for &i in indices {
        if (0..rows).contains(&i) {
            data.extend_from_slice(&table.data[i as usize * row..(i as usize + 1) * row]);
        } else {
            data.extend(std::iter::repeat_n(0.0, row));
        }
    }
    let mut shape = index_shape.to_vec();
    shape.extend_from_slice(&table.shape[1..]);
    Nd::new(&shape, data)
}

/// Softmax attention within each packed sequence: `qkv` is `[tokens, 3 ×
/// hidden]` (queries, keys, values, each `heads` runs), the result
/// `[tokens, hidden]`.
pub(crate) fn attention(qkv: &Nd, heads: usize, lengths: &[usize]) -> Nd {
    let (tokens, width) = (qkv.shape[0], qkv.shape[1]);
    let hidden = width / 3;
    let head_dim = hidden / heads;
    let mut out = vec![0.0; tokens * hidden];
    let mut start = 0;
    for &len in lengths {
        for head in 0..heads {
            let at = |row: usize, part: usize, e: usize| {
                qkv.data[(start + row) * width + part * hidden + head * head_dim + e]
            };
            for i in 0..len {
                let scores: Vec<f64> = (0..len)
                    .map(|j| (0..head_dim).map(|e| at(i, 0, e) * at(j, 1, e)).sum())
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                for e in 0..head_dim {
                    out[(start + i) * hidden + head * head_dim + e] =
                        (0..len).map(|j| weights[j] / sum * at(j, 2, e)).sum();
                }
            }
        }
        start += len;
    }
    Nd::new(&[tokens, hidden], out)
}
