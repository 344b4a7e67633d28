//! Device buffers as their next owner finds them.

use super::on_every_backend;

/// A buffer handed out again (the cpu backend's recycler, CUDA's
/// stream-ordered pool) must not show its last owner's bytes: tensors of
/// different tenants share a device, and an op output a kernel leaves
/// partly unwritten, or a read of padding, would leak them.
#[test]
fn a_reallocated_buffer_reads_as_zeros() {
    on_every_backend("a_reallocated_buffer_reads_as_zeros", |backend, _| {
        let name = backend.description().name;
        // Big enough for the cpu backend to recycle (64 KiB and up), and
        // a size the CUDA pool hands back as it was freed.
        for bytes in [1 << 20, 3 << 18] {
            let pattern: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8 | 1).collect();
            let again = backend.reallocated(&pattern).unwrap();
            let stale = again.iter().filter(|&&b| b != 0).count();
            assert_eq!(
                stale, 0,
                "{name}: {stale} of {bytes} bytes of a reallocated buffer are not zero"
            );
        }
    });
}
