//! Engines: the data planes that carry a vnet's IP packets.
//!
//! - [`userspace`]: a userspace TCP/IP stack (smoltcp) per network: no root,
//!   no TUN. WireGuard instances feed it decrypted packets.
//!
//! The `kernel` engine (a TUN in an unnamed user+net namespace) comes with
//! its issue, behind the same interface.

pub mod userspace;
