//! SIGTERM: the request in flight finishes, or is cancelled past the grace period.

use std::io::Read;
use std::net::TcpStream;

use super::*;

#[test]
fn sigterm_finishes_the_request_in_flight_and_exits_0() {
    let mut server = Server::start(&[]);
    let mut stream = open_stream(&server, &long_stream(BASE, 300));
    server.sigterm();
    // The stream runs to its end and closes properly.
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert!(rest.contains("data: [DONE]"), "{rest}");
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}");
    assert!(TcpStream::connect(&server.addr).is_err());
}

#[test]
fn sigterm_past_the_grace_period_cancels_the_stream_and_exits_0() {
    let mut server = Server::start(&["--shutdown-grace", "0"]);
    let mut stream = open_stream(&server, &long_stream(BASE, 500));
    let before = server.health();
    server.sigterm();
    // The stream is cut: an error event naming the shutdown, then [DONE], no finish reason.
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"code\":\"server_shutting_down\""), "{rest}");
    assert!(rest.contains("data: [DONE]"), "{rest}");
    assert!(!rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert!(before["running"] == 1, "{before}");
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}");
}
