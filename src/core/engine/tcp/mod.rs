//! meshgate's own TCP, sans-IO: what the `userspace` engine terminates
//! tunnelled connections with.
//!
//! smoltcp's TCP (1 s minimum RTO, go-back-N after a timeout, one hole
//! repaired per round trip, no SACK, no pacing) collapsed on lossy paths:
//! 3 Mbit/s where the kernel's Cubic gets 9 and its BBR 440 (10 ms each
//! way, 0.5 % loss). This one follows the kernel's recipe:
//!
//! - `wire`: segments in and out (checksums, MSS, window scale,
//!   SACK-permitted, SACK blocks, timestamps).
//! - `recv`: the receive ring with any number of holes (up to
//!   [`recv::MAX_RANGES`] ranges), which SACK blocks report.
//! - `send`: the send buffer and the scoreboard of sent segments; RACK
//!   (RFC 8985) decides loss by time.
//! - `cc`: RTT (RFC 6298, 200 ms floor), CUBIC (RFC 9438), the pacer.
//! - `socket`: the state machine (RFC 9293), recovery with PRR (RFC 6937),
//!   tail loss probes, the retransmission timer, keep-alive, persist.
//!
//! Nothing here does I/O or reads a clock: the caller passes `now`, feeds
//! parsed segments and takes whole IP packets out, so a simulated lossy,
//! reordering, rate-limited path (`sim`, tests only) drives two sockets
//! deterministically. See `docs/TCP.md` for the design and its tests.

pub mod cc;
pub mod recv;
pub mod send;
pub mod seq;
#[cfg(test)]
mod sim;
pub mod socket;
#[cfg(test)]
mod tests;
pub mod wire;
