//! One device, several tenants: no tenant's backlog, budget overrun or
//! leftover bytes reaches another.

use gust_gpu_bridge::Backend;
use gust_gpu_bridge::backend::cpu::CpuBackend;

#[test]
fn the_cpu_backend_leaves_a_core_to_the_host() {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        eprintln!("the_cpu_backend_leaves_a_core_to_the_host: SKIPPED: RAYON_NUM_THREADS chooses");
        return;
    }
    let expected = cores.saturating_sub(1).max(1);
    let name = CpuBackend::new(1 << 20).describe().name;
    assert_eq!(name, format!("cpu ({expected} threads)"), "{cores} cores");
}
