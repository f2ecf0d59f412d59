//! The smoltcp phy device: packets in from a queue, packets out into an
//! outbox the task hands to the sink. Buffers are recycled both ways, so the
//! steady state allocates nothing per packet.

use std::collections::VecDeque;

use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Owned by the stack's task (not shared), lent to smoltcp while it polls.
pub(super) struct Device {
    /// Inbound packets, oldest first; each `Vec` holds exactly one packet.
    pub rx: VecDeque<Vec<u8>>,
    /// Inbound buffers smoltcp is done with, to go back to the inject pool.
    pub rx_done: Vec<Vec<u8>>,
    /// Emitted packets: a buffer and the packet's length in it.
    pub outbox: Vec<(Vec<u8>, usize)>,
    /// Spare transmit buffers.
    pub tx_free: Vec<Vec<u8>>,
    mtu: usize,
}

impl Device {
    pub fn new(mtu: usize) -> Self {
        Device {
            rx: VecDeque::new(),
            rx_done: Vec::new(),
            outbox: Vec::new(),
            tx_free: Vec::new(),
            mtu,
        }
    }

    /// Drops the next inbound packet unprocessed.
    pub fn skip_rx(&mut self) {
        if let Some(buf) = self.rx.pop_front() {
            self.rx_done.push(buf);
        }
    }
}

/// Receives one queued packet.
pub(super) struct RxToken<'a> {
    buf: Vec<u8>,
    done: &'a mut Vec<Vec<u8>>,
}

/// Writes one packet into a recycled buffer in the outbox.
pub(super) struct TxToken<'a> {
    outbox: &'a mut Vec<(Vec<u8>, usize)>,
    free: &'a mut Vec<Vec<u8>>,
    mtu: usize,
}

impl phy::Device for Device {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let buf = self.rx.pop_front()?;
        Some((
            RxToken {
                buf,
                done: &mut self.rx_done,
            },
            TxToken {
                outbox: &mut self.outbox,
                free: &mut self.tx_free,
                mtu: self.mtu,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            outbox: &mut self.outbox,
            free: &mut self.tx_free,
            mtu: self.mtu,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps.max_burst_size = None;
        caps.checksum = ChecksumCapabilities::default();
        caps
    }
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let r = f(&self.buf);
        self.done.push(self.buf);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = self
            .free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.mtu.max(len)));
        // Recycled buffers keep their length, so only growth is zeroed.
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let r = f(&mut buf[..len]);
        self.outbox.push((buf, len));
        r
    }
}
