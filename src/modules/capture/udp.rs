//! TPROXY for UDP: datagrams the rules deliver with their destination
//! intact, as sessions of the one transparent UDP path
//! ([`OnRamp::serve_transparent_udp`]); answers leave from the original
//! destination through a transparent reply socket.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::CaptureConfig;
use crate::core::addr::HostPort;
use crate::core::net::datagram::{bind_reply_udp, DatagramSocket, TproxyUdp};
use crate::core::spine::door::Live;
use crate::core::spine::onramp::transparent::TransparentDatagrams;
use crate::core::spine::onramp::OnRamp;

struct Tproxy(TproxyUdp);

#[async_trait]
impl TransparentDatagrams for Tproxy {
    async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
        self.0.recv(buf).await
    }
    fn reply_from(&self, orig: SocketAddr) -> io::Result<Arc<dyn DatagramSocket>> {
        bind_reply_udp(orig)
    }
}

/// Receives on `socket` until `cancel`.
pub(super) async fn serve(
    onramp: Arc<OnRamp>,
    state: Arc<Live<CaptureConfig>>,
    socket: TproxyUdp,
    cancel: CancellationToken,
) {
    let live = state.clone();
    let target_of = move |orig: SocketAddr| {
        (!super::to_capture_port(live.get().door.listen.0, orig)).then(|| HostPort {
            host: orig.ip().to_canonical().to_string(),
            port: orig.port(),
        })
    };
    let rules = move || state.get().door.session_rules();
    onramp
        .serve_transparent_udp(Arc::new(Tproxy(socket)), target_of, rules, cancel)
        .await;
}
