//! Casts between every pair of dtypes on raw bit patterns: every edge a
//! cast has, values from both backends' former test lists, and random bits.

use gust_gpu_bridge::{DType, Kernel};
use half::{bf16, f16};

use super::on_every_backend;

/// Round |v| to `bits` significant bits, to nearest even, exactly.
fn round_to_bits(v: u64, bits: u32) -> u64 {
    let width = 64 - v.leading_zeros();
    if width <= bits {
        return v;
    }
    let shift = width - bits;
    let (q, rem, half) = (v >> shift, v & ((1 << shift) - 1), 1u64 << (shift - 1));
    let q = if rem > half || (rem == half && q & 1 == 1) {
        q + 1
    } else {
        q
    };
    q << shift
}

/// An integer correctly rounded to a float of `bits` significant bits
/// (exact as f64, so `from_f64` below only repackages it).
fn round_int(v: i64, bits: u32) -> f64 {
    let magnitude = round_to_bits(v.unsigned_abs(), bits) as f64;
    if v < 0 { -magnitude } else { magnitude }
}

/// `Kernel::Cast` on raw element bits (low 16 bits for halves): Rust's
/// `as` for float → int, clamping for int → int, one rounding to
/// nearest even into narrower floats.
fn cast_ref(from: DType, to: DType, raw: u32) -> u32 {
    enum Value {
        Float(f32),
        Int(i64),
    }
    let value = match from {
        DType::F32 => Value::Float(f32::from_bits(raw)),
        DType::F16 => Value::Float(f16::from_bits(raw as u16).to_f32()),
        DType::BF16 => Value::Float(bf16::from_bits(raw as u16).to_f32()),
        DType::I32 => Value::Int(i64::from(raw as i32)),
        DType::U32 => Value::Int(i64::from(raw)),
        quantized => unreachable!("{quantized} has no single elements"),
    };
    match (value, to) {
        (Value::Float(f), DType::F32) => f.to_bits(),
        (Value::Float(f), DType::F16) => u32::from(f16::from_f32(f).to_bits()),
        (Value::Float(f), DType::BF16) => u32::from(bf16::from_f32(f).to_bits()),
        (Value::Float(f), DType::I32) => f as i32 as u32,
        (Value::Float(f), DType::U32) => f as u32,
        (Value::Int(i), DType::F32) => (i as f32).to_bits(),
        (Value::Int(i), DType::F16) => u32::from(f16::from_f64(round_int(i, 11)).to_bits()),
        (Value::Int(i), DType::BF16) => u32::from(bf16::from_f64(round_int(i, 8)).to_bits()),
        // Int to int clamps (Kernel::Cast), it does not wrap.
        (Value::Int(i), DType::I32) => {
            i.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32 as u32
        }
        (Value::Int(i), DType::U32) => i.clamp(0, i64::from(u32::MAX)) as u32,
        (_, quantized) => unreachable!("the bridge does not cast to {quantized}"),
    }
}

fn is_nan_bits(dtype: DType, raw: u32) -> bool {
    match dtype {
        DType::F32 => f32::from_bits(raw).is_nan(),
        DType::F16 => f16::from_bits(raw as u16).is_nan(),
        DType::BF16 => bf16::from_bits(raw as u16).is_nan(),
        DType::I32 | DType::U32 => false,
        quantized => unreachable!("{quantized} has no single elements"),
    }
}

/// Values that sit on every edge a cast has: signed zeros, rounding
/// ties with and without sticky bits, overflow, saturation, NaN.
fn cast_specials(dtype: DType) -> Vec<u32> {
    match dtype {
        DType::F32 => {
            let mut v: Vec<u32> = [
                0.0f32,
                -0.0,
                1.0,
                -1.0,
                0.5,
                1.5,
                2.5,
                -2.5,
                0.999_999_94,
                -0.999_999_94,
                65504.0,
                65519.996,
                65520.0,
                1e-8,
                5.96e-8,
                2.98e-8,
                2.99e-8,
                3e38,
                -3e38,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
                2_147_483_520.0,
                2_147_483_648.0,
                -2_147_483_648.0,
                -2_147_483_904.0,
                4_294_967_040.0,
                4_294_967_296.0,
                1e10,
                -1e10,
                f32::MIN_POSITIVE,
                1e-45,
            ]
            .iter()
            .map(|f| f.to_bits())
            .collect();
            // 1.0 plus f16 / bf16 rounding ties, exact and with sticky bits.
            v.extend([
                0x3F80_1000,
                0x3F80_1001,
                0x3F80_3000,
                0x3F80_8000,
                0x3F80_8001,
                0x3F81_8000,
                0x7FC0_0001,
                0xFF80_0001,
            ]);
            v
        }
        DType::F16 => vec![
            0x0000, 0x8000, 0x0001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00,
            0x7E00, 0x7C01, 0x3555,
        ],
        DType::BF16 => vec![
            0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0, 0x7F81,
            0x4F00, 0xCF00, 0x4F80, 0x4EFF, 0xCF01,
        ],
        DType::I32 => [
            0i32,
            1,
            -1,
            i32::MAX,
            i32::MIN,
            65504,
            65519,
            65520,
            65535,
            16_777_216,
            16_777_217,
            16_777_219,
            -16_777_217,
            (1 << 30) + (1 << 22) + 1,
            (1 << 30) + (1 << 22),
            (1 << 24) + (1 << 16),
            (1 << 24) + (1 << 16) + 1,
            33_554_435,
        ]
        .iter()
        .map(|&i| i as u32)
        .collect(),
        DType::U32 => vec![
            0,
            1,
            u32::MAX,
            1 << 31,
            (1 << 31) + 1,
            65520,
            16_777_217,
            4_294_967_040,
            (1 << 31) + (1 << 23) + 1,
            (1 << 31) + (1 << 23),
        ],
        quantized => unreachable!("{quantized} has no single elements"),
    }
}

/// Values in the float dtypes and integers in the int dtypes that used to
/// be the wgpu backend's cast cases, as `dtype`'s raw bits.
fn listed(dtype: DType) -> Vec<u32> {
    const FLOATS: [f64; 30] = [
        0.0,
        -0.0,
        1.0,
        -1.5,
        2.5,
        -2.5,
        0.49999997,
        1e-3,
        3.3e-5,
        6.0e-8,
        1e-40,
        -7.9,
        65504.0,
        65519.0,
        65520.0,
        1e6,
        -3.0e9,
        2147483520.0,
        2147483648.0,
        -2147483648.0,
        4294967040.0,
        4294967296.0,
        1.0e30,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        123.456,
        -0.3,
        1.00048828125,
        1.0009765625,
    ];
    const INTS: [i64; 30] = [
        0,
        1,
        -1,
        7,
        -8,
        255,
        256,
        257,
        65504,
        65519,
        65520,
        65536,
        16_777_217,
        -16_777_217,
        (1 << 25) + (1 << 17) + 1,
        (1 << 25) + (1 << 17),
        (1 << 24) + 3,
        i32::MAX as i64,
        i32::MIN as i64,
        0x7fff_ff80,
        0x8000_0000,
        0xffff_ffff,
        0xffff_ff7f,
        0xc000_0001,
        123_456_789,
        -123_456_789,
        1 << 30,
        3,
        -3,
        100,
    ];
    match dtype {
        DType::F32 => FLOATS.iter().map(|&v| (v as f32).to_bits()).collect(),
        DType::F16 => FLOATS
            .iter()
            .map(|&v| u32::from(f16::from_f64_const(v).to_bits()))
            .collect(),
        DType::BF16 => FLOATS
            .iter()
            .map(|&v| u32::from(bf16::from_f64_const(v).to_bits()))
            .collect(),
        DType::I32 => INTS.iter().map(|&v| (v as i32).cast_unsigned()).collect(),
        DType::U32 => INTS.iter().map(|&v| v as u32).collect(),
        quantized => unreachable!("{quantized} has no single elements"),
    }
}

fn raw_bytes(words: &[u32], elem_size: usize) -> Vec<u8> {
    words
        .iter()
        .flat_map(|w| w.to_le_bytes().into_iter().take(elem_size))
        .collect()
}

#[test]
fn cast_matches_reference() {
    on_every_backend("cast_matches_reference", |dev, rng| {
        let name = dev.description().name;
        let seed = rng.seed;
        for from in DType::ALL {
            for to in DType::ALL {
                if from == to {
                    continue;
                }
                let mut raw = cast_specials(from);
                raw.extend(listed(from));
                let mask = if from.size() == 2 { 0xFFFF } else { u32::MAX };
                raw.extend((0..4000).map(|_| rng.next_u32() & mask));
                // Odd counts exercise the half-filled last word of 2-byte
                // data.
                if raw.len().is_multiple_of(2) {
                    raw.push(rng.next_u32() & mask);
                }
                let len = raw.len();
                let kernel = Kernel::Cast { from, to, len };
                let out = dev.run(&kernel, &[&raw_bytes(&raw, from.size())], len * to.size());
                for (i, &x) in raw.iter().enumerate() {
                    let at = i * to.size();
                    let mut word = [0u8; 4];
                    word[..to.size()].copy_from_slice(&out[at..at + to.size()]);
                    let got = u32::from_le_bytes(word);
                    let expected = cast_ref(from, to, x);
                    let both_nan = is_nan_bits(to, expected) && is_nan_bits(to, got);
                    assert!(
                        got == expected || both_nan,
                        "cast {from} -> {to} of {x:#010x} on {name}: got {got:#010x}, expected {expected:#010x} (seed {seed})"
                    );
                }
            }
        }
        // Same dtype: a plain copy of the bits, signalling NaNs included
        // (a cast through a wider float would quiet them).
        let mut raw: Vec<u32> = vec![0x7f80_0001, 0xff99_745b];
        raw.extend((0..8).map(|_| rng.next_u32()));
        let kernel = Kernel::Cast {
            from: DType::F32,
            to: DType::F32,
            len: 10,
        };
        assert_eq!(
            dev.run(&kernel, &[&raw_bytes(&raw, 4)], 40),
            raw_bytes(&raw, 4),
            "copy on {name}"
        );
    });
}
