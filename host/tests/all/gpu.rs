//! The host side of `gust:gpu`: guests chain ops on the bridge's devices,
//! quotas and policies are enforced, and device memory never outlives a call.

use std::sync::Arc;
use std::time::Duration;

use gust_gpu_bridge::backend::cpu::CpuBackend;
use gust_gpu_bridge::backend::wgpu::{WgpuBackend, WgpuOptions};
use gust_gpu_bridge::{Account, Device, DeviceOptions};
use gust_host::runtime::GpuGrant;
use gust_host::runtime::{CallLimits, Invocation, LoadedComponent, Outcome, Runtime};
use gust_test_artifacts as artifacts;

use super::{load, request, runtime};

/// A private cpu device, so device-level byte counts are this test's alone.
pub(crate) fn cpu_device() -> Device {
    Device::start(CpuBackend::new(1 << 30), DeviceOptions::default()).expect("cpu device")
}

pub(crate) fn grant(device: &Device, account: &Arc<Account>) -> CallLimits {
    CallLimits {
        timeout: Duration::from_secs(20),
        gpu: Some(GpuGrant {
            devices: Arc::from(vec![device.clone()]),
            account: Arc::clone(account),
            models: None,
        }),
        ..CallLimits::default()
    }
}

pub(crate) async fn call(
    rt: &Runtime,
    component: &LoadedComponent,
    body: &str,
    limits: &CallLimits,
) -> Invocation {
    rt.invoke(component, request(body), limits).await
}

pub(crate) fn text(invocation: &Invocation) -> String {
    match &invocation.outcome {
        Outcome::Ok(response) => String::from_utf8(response.body.clone()).expect("utf-8"),
        other => panic!("expected ok, got {other:?}"),
    }
}

/// What the `chain` command of the tensors fixture computes, in f64.
pub(crate) fn chain_reference() -> Vec<f64> {
    let x: Vec<f64> = (0..12).map(|i| (f64::from(i) - 6.0) / 4.0).collect();
    let w: Vec<f64> = (0..20)
        .map(|i| (f64::from(i * 7 % 11) - 5.0) / 8.0)
        .collect();
    let b: Vec<f64> = (0..5).map(|i| f64::from(i) / 10.0).collect();
    (0..3)
        .map(|r| {
            let h: Vec<f64> = (0..5)
                .map(|c| ((0..4).map(|k| x[r * 4 + k] * w[k * 5 + c]).sum::<f64>() + b[c]).max(0.0))
                .collect();
            let max = h.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = h.iter().map(|v| (v - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.iter().zip(&b).map(|(v, b)| v / sum * b).sum()
        })
        .collect()
}

pub(crate) fn assert_chain(body: &str) {
    let got: Vec<f64> = body.lines().map(|l| l.parse().expect("a number")).collect();
    let want = chain_reference();
    assert_eq!(got.len(), want.len(), "{body}");
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs().max(1e-3),
            "got {got:?}, want {want:?}"
        );
    }
}

#[tokio::test]
async fn a_trapping_guest_leaves_no_device_memory_behind() {
    let (rt, _dir) = runtime();
    let tensors = load(&rt, artifacts::TENSORS_COMPONENT);
    let device = cpu_device();
    let tenant = Account::new("tenant", None, None);
    let limits = grant(&device, &tenant);
    let trapped = call(&rt, &tensors, "trap 8", &limits).await;
    assert!(
        matches!(trapped.outcome, Outcome::Trap { .. }),
        "{:?}",
        trapped.outcome
    );
    // Ops are pipelined: queued work holds its tensors until it has run.
    device.synchronize(&tenant).await.unwrap();
    assert_eq!(
        device.used_bytes(),
        0,
        "the trapped call's tensors were freed"
    );
    assert_eq!(tenant.used_bytes(), 0);
    assert_eq!(tenant.peak_bytes(), 8 << 20, "the tensors did exist");
    // The same holds for a call that returns normally with tensors alive.
    let held = call(&rt, &tensors, "hold 3", &limits).await;
    assert_eq!(text(&held), "3 ");
    // Ops are pipelined: queued work holds its tensors until it has run.
    device.synchronize(&tenant).await.unwrap();
    assert_eq!(device.used_bytes(), 0);
}

#[tokio::test]
async fn a_timed_out_guest_frees_its_tensors_too() {
    let (rt, _dir) = runtime();
    let tensors = load(&rt, artifacts::TENSORS_COMPONENT);
    let device = cpu_device();
    let tenant = Account::new("tenant", None, None);
    let mut limits = grant(&device, &tenant);
    // Enough time to allocate a little, not 4 GiB worth of zeroed tensors.
    limits.timeout = Duration::from_millis(300);
    let invocation = call(&rt, &tensors, "hold 4000", &limits).await;
    assert!(
        matches!(invocation.outcome, Outcome::Timeout { .. } | Outcome::Ok(_)),
        "{:?}",
        invocation.outcome
    );
    // Ops are pipelined: queued work holds its tensors until it has run.
    device.synchronize(&tenant).await.unwrap();
    assert_eq!(device.used_bytes(), 0);
    assert_eq!(tenant.used_bytes(), 0);
}

#[tokio::test]
async fn the_tenant_memory_quota_is_shared_by_its_calls() {
    let (rt, _dir) = runtime();
    let tensors = load(&rt, artifacts::TENSORS_COMPONENT);
    let device = cpu_device();
    let tenant = Account::new("tenant", Some(5 << 20), None);
    let limits = grant(&device, &tenant);
    let answer = text(&call(&rt, &tensors, "hold 8", &limits).await);
    assert!(
        answer.starts_with("5 quota-exceeded: tenant: device memory quota"),
        "{answer}"
    );
    // Ops are pipelined: queued work holds its tensors until it has run.
    device.synchronize(&tenant).await.unwrap();
    assert_eq!(tenant.used_bytes(), 0);
}

#[tokio::test]
async fn without_a_grant_the_bridge_is_forbidden() {
    let (rt, _dir) = runtime();
    let tensors = load(&rt, artifacts::TENSORS_COMPONENT);
    let invocation = call(&rt, &tensors, "chain", &CallLimits::default()).await;
    let Outcome::GuestError(error) = &invocation.outcome else {
        panic!("expected the guest's error, got {:?}", invocation.outcome)
    };
    assert_eq!(error.code, "gpu-forbidden");
    assert_eq!(error.status, Some(403));
    assert!(
        error.message.contains("may not use the GPU bridge"),
        "{}",
        error.message
    );
    assert_eq!(
        text(&call(&rt, &tensors, "devices", &CallLimits::default()).await),
        ""
    );
}

/// What the `layers` command of the tensors fixture computes, in f64: the
/// two linear layers side by side (`[2, 6]`) and their SwiGLU (`[2, 3]`).
fn layers_reference() -> (Vec<f64>, Vec<f64>) {
    let x: Vec<f64> = (0..128)
        .map(|i| {
            if i % 32 == 0 {
                127.0 / 128.0
            } else {
                (f64::from(i % 17) - 8.0) / 128.0
            }
        })
        .collect();
    let w = |step: usize, r: usize, c: usize| ((r * 7 + c * step) % 21) as f64 / 16.0 - 10.0 / 16.0;
    let mut y = Vec::new();
    for row in 0..2 {
        for (step, r) in [(3, 0), (3, 1), (3, 2), (5, 0), (5, 1), (5, 2)] {
            y.push(
                (0..64)
                    .map(|c| x[row * 64 + c] * w(step, r, c))
                    .sum::<f64>(),
            );
        }
    }
    let gated = (0..6)
        .map(|i| {
            let (row, c) = (i / 3, i % 3);
            let (gate, up) = (y[row * 6 + c], y[row * 6 + 3 + c]);
            gate / (1.0 + (-gate).exp()) * up
        })
        .collect();
    (y, gated)
}

#[tokio::test]
async fn guests_multiply_quantized_blocks_with_linear_and_swiglu() {
    let (rt, _dir) = runtime();
    let tensors = load(&rt, artifacts::TENSORS_COMPONENT);
    let device = cpu_device();
    let account = Account::new("t", None, None);
    let invocation = call(&rt, &tensors, "layers", &grant(&device, &account)).await;
    let body = text(&invocation);
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 4, "{body}");
    assert_eq!(lines[0], "Some(BlockFormat::Q80)");
    // Printed as the shortest text that reads back as the same f32.
    let numbers = |line: &str| -> Vec<f64> {
        line.split(' ')
            .map(|v| f64::from(v.parse::<f32>().expect("a number")))
            .collect()
    };
    let (y, gated) = layers_reference();
    // The activations' 8-bit blocks are exact: so is the product.
    assert_eq!(numbers(lines[1]), y, "{body}");
    for (got, want) in numbers(lines[2]).iter().zip(&gated) {
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{body}");
    }
    assert_eq!(lines[3], "shape-mismatch", "{body}");
    device.synchronize(&account).await.unwrap();
    assert_eq!(device.used_bytes(), 0, "the call's tensors are freed");
}

#[tokio::test]
async fn shape_errors_reach_the_guest_as_values() {
    let (rt, _dir) = runtime();
    let tensors = load(&rt, artifacts::TENSORS_COMPONENT);
    let device = cpu_device();
    let invocation = call(
        &rt,
        &tensors,
        "mismatch",
        &grant(&device, &Account::new("t", None, None)),
    )
    .await;
    let Outcome::GuestError(error) = &invocation.outcome else {
        panic!("expected the guest's error, got {:?}", invocation.outcome)
    };
    assert_eq!(error.code, "gpu-shape-mismatch");
    assert!(
        error.message.contains("inner dimensions differ"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn the_tensor_math_example_runs_on_every_device() {
    let (rt, _dir) = runtime();
    let example = load(&rt, artifacts::EXAMPLE_TENSOR_MATH_COMPONENT);
    let mut devices = vec![cpu_device()];
    match WgpuBackend::open(&WgpuOptions {
        allow_software: true,
    }) {
        Ok(backend) => {
            devices.push(Device::start(backend, DeviceOptions::default()).expect("wgpu device"))
        }
        Err(e) => eprintln!("skipping the wgpu run: {e}"),
    }
    let mut answers = Vec::new();
    for device in &devices {
        let mut req = request(r#"{"inputs": [[1, 2, 3, 4], [-1, 0.5, 0, 2], [0, 0, 0, 0]]}"#);
        req.content_type = "application/json".into();
        let invocation = rt
            .invoke(
                &example,
                req,
                &grant(device, &Account::new("t", None, None)),
            )
            .await;
        let body: serde_json::Value = serde_json::from_str(&text(&invocation)).expect("json");
        assert!(
            body["device"]
                .as_str()
                .is_some_and(|d| d.starts_with(device.kind().as_str())),
            "{body}"
        );
        let probabilities = body["probabilities"].as_array().expect("rows").clone();
        assert_eq!(probabilities.len(), 3);
        for row in &probabilities {
            let sum: f64 = row
                .as_array()
                .expect("row")
                .iter()
                .map(|v| v.as_f64().expect("number"))
                .sum();
            assert!((sum - 1.0).abs() < 1e-5, "{row}");
        }
        answers.push((probabilities, body["classes"].clone()));
    }
    for (probabilities, classes) in &answers[1..] {
        assert_eq!(
            classes, &answers[0].1,
            "every device picks the same classes"
        );
        for (row, first) in probabilities.iter().zip(&answers[0].0) {
            for (a, b) in row
                .as_array()
                .expect("row")
                .iter()
                .zip(first.as_array().expect("row"))
            {
                assert!((a.as_f64().expect("n") - b.as_f64().expect("n")).abs() < 1e-5);
            }
        }
    }
}
