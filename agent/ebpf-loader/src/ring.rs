//! A BPF ring buffer consumer whose position reaches the kernel only when told.
//!
//! aya's reader hands the kernel a record's space back as soon as the record is dropped,
//! before the caller has written it anywhere. Here records are read in order and the
//! consumer position the kernel sees moves only on [`Ring::commit`], which the caller
//! makes once what it read is written (into the audit log's file). A process killed in
//! between leaves the records in the ring (pinned under bpffs, they outlive it) for the
//! next reader, which starts where the last commit left off.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering},
};

use aya::maps::MapData;

const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HEADER_BYTES: usize = 8;

/// One mmap'ed region, unmapped when dropped.
struct Mapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize, prot: libc::c_int, offset: usize) -> io::Result<Mapping> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::other("ring offset out of range"))?;
        // SAFETY: a fresh shared mapping of a BPF ring buffer's fd at the offsets the
        // kernel documents (consumer page at 0, producer page and twice the data after it);
        // the result is checked before use.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), offset) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(ptr).map(|ptr| Mapping { ptr, len }).ok_or_else(|| io::Error::other("mmap returned null"))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; nothing borrows the mapping
        // past the `Ring` that owns it.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}

// SAFETY: the mappings are plain shared memory; all access goes through atomics or copies
// made by the one `Ring` that owns them (`&mut self` for every read).
unsafe impl Send for Mapping {}

/// A ring buffer map read with an explicit commit.
pub struct Ring {
    map: MapData,
    consumer: Mapping,
    producer: Mapping,
    page: usize,
    mask: usize,
    /// The position read up to (not yet committed beyond `committed`).
    read: usize,
    committed: usize,
}

impl Ring {
    /// Maps the ring buffer `map` (a BPF_MAP_TYPE_RINGBUF); reading starts at the
    /// position the kernel holds (where the last commit, by any process, left off).
    pub fn new(map: MapData) -> io::Result<Ring> {
        let size = map.info().map_err(io::Error::other)?.max_entries() as usize;
        // SAFETY: sysconf with a constant argument.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        if !size.is_power_of_two() || size < page {
            return Err(io::Error::other(format!("ring buffer of {size} bytes is not a power-of-two page multiple")));
        }
        let fd = map.fd().as_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size, libc::PROT_READ, page)?;
        let mut ring = Ring { map, consumer, producer, page, mask: size - 1, read: 0, committed: 0 };
        ring.read = ring.consumer_pos().load(Ordering::Acquire);
        ring.committed = ring.read;
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicUsize {
        // SAFETY: the consumer page starts with the kernel's `unsigned long consumer_pos`,
        // page-aligned, valid while `self.consumer` is mapped.
        unsafe { self.consumer.ptr.cast::<AtomicUsize>().as_ref() }
    }

    fn producer_pos(&self) -> usize {
        // SAFETY: as above, for the producer page's `producer_pos` (read-only to us).
        unsafe { self.producer.ptr.cast::<AtomicUsize>().as_ref() }.load(Ordering::Acquire)
    }

    /// The map (for pinning and polling).
    pub fn map(&self) -> &MapData {
        &self.map
    }

    /// The next committed record after what was read, handed to `f` (a copy is not
    /// made); `None` when the ring holds nothing more that is complete.
    pub fn next_with<R>(&mut self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        loop {
            if self.read == self.producer_pos() {
                return None;
            }
            let offset = self.read & self.mask;
            // SAFETY: the data area is mapped twice after the producer page, so
            // `offset + HEADER_BYTES` (offset < size) is inside it; the header is a u32
            // the kernel writes atomically.
            let header =
                unsafe { &*self.producer.ptr.as_ptr().cast::<u8>().add(self.page + offset).cast::<AtomicU32>() }
                    .load(Ordering::Acquire);
            if header & BUSY_BIT != 0 {
                return None;
            }
            let len = (header & !(BUSY_BIT | DISCARD_BIT)) as usize;
            if len > self.mask {
                // A corrupt header: never read past the mapping.
                return None;
            }
            let start = self.page + offset + HEADER_BYTES;
            self.read += (HEADER_BYTES + len).next_multiple_of(8);
            if header & DISCARD_BIT != 0 {
                continue;
            }
            // SAFETY: start + len <= page + 2 * size (offset < size, len <= size - 1 and
            // the data is mapped twice), and the kernel does not reuse the record's space
            // before our consumer position passes it (it does not until `commit`).
            let data = unsafe { std::slice::from_raw_parts(self.producer.ptr.as_ptr().cast::<u8>().add(start), len) };
            return Some(f(data));
        }
    }

    /// Hands the space of every record read so far back to the kernel.
    pub fn commit(&mut self) {
        if self.read != self.committed {
            self.consumer_pos().store(self.read, Ordering::Release);
            self.committed = self.read;
        }
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
