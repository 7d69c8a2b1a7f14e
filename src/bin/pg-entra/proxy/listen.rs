//! Where the proxy listens, and who is connecting: only the account that runs the proxy, and
//! root, may use its identity.
//!
//! On a Unix socket the kernel tells the peer's account (`SO_PEERCRED`). On loopback TCP the
//! connecting socket is the one whose local address is the peer's and whose remote address is
//! the proxy's, and the kernel knows its owner: asked by that address pair through socket
//! diagnostics (`NETLINK_SOCK_DIAG`, what `ss` uses: one lookup, microseconds), else read
//! from the `uid` column of `/proc/net/tcp` (or `tcp6`), which the kernel builds by walking
//! its whole table (milliseconds per read on a big host, measured 4 ms here). Linux only;
//! other systems refuse TCP clients unless remote clients are allowed.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Who may use the proxy: its own account and root.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Allowed {
    own_uid: u32,
}

impl Allowed {
    /// The account running this process, and root. Refused for the overflow uid (`nobody`,
    /// 65534 by default): peers whose account is not mapped into this user namespace show
    /// as that uid, so it proves nothing.
    pub(crate) fn this_account() -> io::Result<Self> {
        let own_uid = own_uid()?;
        let overflow = std::fs::read_to_string("/proc/sys/kernel/overflowuid")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(65534u32);
        if own_uid == overflow {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the proxy does not run as uid {overflow} (nobody): unmapped accounts show as that uid; run it as an account of its own"
                ),
            ));
        }
        Ok(Self { own_uid })
    }

    pub(crate) fn permits(self, uid: u32) -> bool {
        uid == self.own_uid || uid == 0
    }

    /// Whether `uid` is the account running the proxy.
    pub(crate) fn is_own(self, uid: u32) -> bool {
        uid == self.own_uid
    }
}

/// The account this process runs as (its effective uid).
#[cfg(target_os = "linux")]
fn own_uid() -> io::Result<u32> {
    Ok(rustix::process::geteuid().as_raw())
}

#[cfg(not(target_os = "linux"))]
fn own_uid() -> io::Result<u32> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "the proxy checks its clients' accounts on Linux only",
    ))
}

/// A connection the proxy accepted; its peer's account is looked up by [`owner`](Self::owner),
/// in the connection's own task.
pub(crate) enum Accepted {
    Tcp {
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    },
    Unix {
        stream: UnixStream,
        uid: Option<u32>,
    },
}

impl Accepted {
    /// The account that owns the connecting socket, if it is on this host and still
    /// connected. Asked for every TCP peer, loopback or not: a local process may connect from
    /// one of the host's other addresses, and a host that routes to 127.0.0.1 from outside
    /// (`route_localnet`) makes a loopback address no proof of a local peer.
    pub(crate) async fn owner(&self) -> Option<u32> {
        match self {
            Accepted::Tcp { peer, local, .. } => {
                let (peer, local) = (*peer, *local);
                tokio::task::spawn_blocking(move || tcp_owner(local, peer))
                    .await
                    .ok()
                    .flatten()
            }
            Accepted::Unix { uid, .. } => *uid,
        }
    }

    /// Whether the peer's address is not a loopback one (only reachable when remote clients
    /// are allowed).
    pub(crate) fn is_remote(&self) -> bool {
        match self {
            Accepted::Tcp { peer, .. } => !is_local(peer.ip()),
            Accepted::Unix { .. } => false,
        }
    }

    /// The peer and its account, for logs.
    pub(crate) fn describe(&self, uid: Option<u32>) -> String {
        let place = match self {
            Accepted::Tcp { peer, .. } => peer.to_string(),
            Accepted::Unix { .. } => "Unix socket".to_owned(),
        };
        match uid {
            Some(uid) => format!("{place} (uid {uid})"),
            None => place,
        }
    }
}

/// A TCP or Unix-socket listener.
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixSocket),
}

impl Listener {
    /// Accepts one connection (no lookups here: the accept loop never waits on one).
    pub(crate) async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                let local = stream.local_addr()?;
                Ok(Accepted::Tcp {
                    stream,
                    peer,
                    local,
                })
            }
            Listener::Unix(socket) => {
                let (stream, _) = socket.listener.accept().await?;
                let uid = stream.peer_cred().ok().map(|cred| cred.uid());
                Ok(Accepted::Unix { stream, uid })
            }
        }
    }
}

/// A Unix socket named as PostgreSQL names its own (`DIR/.s.PGSQL.PORT`), removed when
/// dropped.
pub(crate) struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl UnixSocket {
    /// Listens at `directory/.s.PGSQL.<port>`. A socket file left by a proxy that is gone
    /// (nothing answers on it) is replaced; a live one is an error.
    pub(crate) async fn bind(directory: &Path, port: u16) -> io::Result<Self> {
        use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
        // A directory others may write to without the sticky bit would let them replace the
        // socket file with their own.
        let folder = std::fs::metadata(directory)?;
        if folder.mode() & 0o022 != 0 && folder.mode() & 0o1000 == 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is writable by other accounts; use a private directory such as /run/user/$UID",
                    directory.display()
                ),
            ));
        }
        let path = directory.join(format!(".s.PGSQL.{port}"));
        match std::fs::symlink_metadata(&path) {
            Ok(existing) if !existing.file_type().is_socket() => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            // Replaced only when nothing listens on it any more (a proxy that is gone).
            Ok(_) => match UnixStream::connect(&path).await {
                Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(&path)?;
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is in use by another server", path.display()),
                    ));
                }
            },
            Err(_) => {}
        }
        let listener = UnixListener::bind(&path)?;
        // Only the owner (and root) may connect; the peer check below holds either way. The
        // file was just created by this process and is not a link.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self { listener, path })
    }

    /// The socket file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether an address belongs to this host's loopback (an IPv4-mapped one included).
pub(crate) fn is_local(ip: IpAddr) -> bool {
    normal(ip).is_loopback()
}

fn normal(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The owner of the socket that connected from `peer` to `local`, while it is connected:
/// from socket diagnostics, else (netlink unavailable) from `/proc/net/tcp` and
/// `/proc/net/tcp6`. `None` when it is not found or no longer connected: refused. (A socket
/// that closed turns into a time-wait entry that both sources show as owned by root.)
#[cfg(target_os = "linux")]
fn tcp_owner(local: SocketAddr, peer: SocketAddr) -> Option<u32> {
    match diag_owner(peer, local) {
        Ok(owner) => owner,
        Err(error) => {
            tracing::debug!(%error, "socket diagnostics unavailable; reading /proc/net/tcp");
            ["/proc/net/tcp", "/proc/net/tcp6"]
                .iter()
                .filter_map(|table| std::fs::read_to_string(table).ok())
                .find_map(|table| owner_in_table(&table, peer, local))
        }
    }
}

/// `TCP_ESTABLISHED`, in the kernel's numbering of TCP states.
const TCP_ESTABLISHED: u8 = 1;
/// `SOCK_DIAG_BY_FAMILY`, the netlink message type of an `inet_diag` request and answer.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 1;
/// Where `idiag_state` sits in an answer: after the 16-byte `nlmsghdr` and `idiag_family`.
const STATE_OFFSET: usize = 16 + 1;
/// Where `idiag_uid` sits: after `inet_diag_msg`'s four one-byte fields, its 48-byte
/// `inet_diag_sockid` and three 32-bit words (`linux/inet_diag.h`); `idiag_inode` follows.
const UID_OFFSET: usize = 16 + 4 + 48 + 12;
const INODE_OFFSET: usize = UID_OFFSET + 4;

/// The owner of the TCP socket bound to `socket` and connected to `remote`, asked of the
/// kernel by exactly that address pair. The lookup is local and immediate; the receive has a
/// short timeout all the same.
#[cfg(target_os = "linux")]
fn diag_owner(socket: SocketAddr, remote: SocketAddr) -> io::Result<Option<u32>> {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, netlink, sockopt};
    let Some(request) = diag_request(socket, remote) else {
        return Ok(None);
    };
    let fd = rustix::net::socket(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        Some(netlink::SOCK_DIAG),
    )?;
    sockopt::set_socket_timeout(
        &fd,
        sockopt::Timeout::Recv,
        Some(std::time::Duration::from_millis(200)),
    )?;
    let kernel = netlink::SocketAddrNetlink::new(0, 0);
    rustix::net::sendto(&fd, &request, SendFlags::empty(), &kernel)?;
    let mut answer = [0u8; 1024];
    let (length, _) = rustix::net::recv(&fd, &mut answer[..], RecvFlags::empty())?;
    Ok(diag_uid(&answer[..length]))
}

/// An `inet_diag_req_v2` for one TCP socket in any state: its family, its own address and
/// port, the remote's, and no cookie (`INET_DIAG_NOCOOKIE`). Multi-byte header fields in
/// host order, addresses and ports in network order, as the kernel reads them.
fn diag_request(socket: SocketAddr, remote: SocketAddr) -> Option<Vec<u8>> {
    let (family, source, destination) = match (normal(socket.ip()), normal(remote.ip())) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            let widen = |ip: Ipv4Addr| {
                let mut words = [0u8; 16];
                words[..4].copy_from_slice(&ip.octets());
                words
            };
            (2u8, widen(source), widen(destination))
        }
        (IpAddr::V6(source), IpAddr::V6(destination)) => {
            (10u8, source.octets(), destination.octets())
        }
        _ => return None,
    };
    let mut request = Vec::with_capacity(72);
    request.extend(72u32.to_ne_bytes());
    request.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend(NLM_F_REQUEST.to_ne_bytes());
    request.extend(1u32.to_ne_bytes()); // sequence number
    request.extend(0u32.to_ne_bytes()); // port ID: the kernel fills it in
    request.extend([family, 6 /* IPPROTO_TCP */, 0, 0]);
    request.extend((1u32 << TCP_ESTABLISHED).to_ne_bytes());
    request.extend(socket.port().to_be_bytes());
    request.extend(remote.port().to_be_bytes());
    request.extend(source);
    request.extend(destination);
    request.extend(0u32.to_ne_bytes()); // any interface
    request.extend([0xff; 8]); // INET_DIAG_NOCOOKIE
    Some(request)
}

/// The `idiag_uid` of an answer to [`diag_request`] for a connected socket that a process
/// still holds (an inode); `None` for an error answer (no such socket), any other state, or
/// anything short.
fn diag_uid(answer: &[u8]) -> Option<u32> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(answer.get(at..at + 4)?.try_into().ok()?))
    };
    let kind = u16::from_ne_bytes(answer.get(4..6)?.try_into().ok()?);
    let state = *answer.get(STATE_OFFSET)?;
    if kind != SOCK_DIAG_BY_FAMILY || state != TCP_ESTABLISHED || word(INODE_OFFSET)? == 0 {
        return None;
    }
    word(UID_OFFSET)
}

#[cfg(not(target_os = "linux"))]
fn tcp_owner(_local: SocketAddr, _peer: SocketAddr) -> Option<u32> {
    None
}

/// In a `/proc/net/tcp` table, the `uid` of the connected socket bound to `socket` and
/// connected to `remote`. Addresses compare after IPv4-mapped IPv6 is read as IPv4 (a dual-stack listener
/// sees an IPv4 client that way).
fn owner_in_table(table: &str, socket: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let want = (
        normal(socket.ip()),
        socket.port(),
        normal(remote.ip()),
        remote.port(),
    );
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, rem, uid) = (fields.get(1)?, fields.get(2)?, fields.get(7)?);
        // Connected (state 01) and held by a process (an inode): not a time-wait entry.
        if *fields.get(3)? != "01" || *fields.get(9)? == "0" {
            return None;
        }
        let (local_ip, local_port) = proc_address(local)?;
        let (rem_ip, rem_port) = proc_address(rem)?;
        ((normal(local_ip), local_port, normal(rem_ip), rem_port) == want)
            .then(|| uid.parse().ok())
            .flatten()
    })
}

/// `0100007F:1F90`: the address as the kernel's 32-bit words in host byte order, in hex; the
/// port in hex.
fn proc_address(text: &str) -> Option<(IpAddr, u16)> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<[u8; 4]>> = address
        .as_bytes()
        .chunks(8)
        .map(|chunk| {
            let word = std::str::from_utf8(chunk).ok()?;
            (word.len() == 8)
                .then(|| u32::from_str_radix(word, 16).ok())
                .flatten()
                .map(u32::to_ne_bytes)
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => return None,
    };
    Some((ip, port))
}

/// The login name of account `uid` from `/etc/passwd` (what libpq sends as the user name
/// when none is given), if listed there.
pub(crate) fn account_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let listed: u32 = fields.nth(1)?.parse().ok()?;
        (listed == uid && !name.is_empty()).then(|| name.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne_hex(bytes: [u8; 4]) -> String {
        format!("{:08X}", u32::from_ne_bytes(bytes))
    }

    #[test]
    fn reads_the_kernels_addresses() {
        let v4 = format!("{}:1F90", ne_hex([127, 0, 0, 1]));
        assert_eq!(
            proc_address(&v4),
            Some((IpAddr::V4(Ipv4Addr::LOCALHOST), 8080))
        );
        let loopback6 = format!(
            "{}{}{}{}:0050",
            ne_hex([0; 4]),
            ne_hex([0; 4]),
            ne_hex([0; 4]),
            ne_hex([0, 0, 0, 1])
        );
        assert_eq!(
            proc_address(&loopback6),
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 80))
        );
        assert_eq!(proc_address("zz:1"), None);
        assert_eq!(proc_address("0100007F"), None);
        assert_eq!(proc_address("0100007F0:1"), None);
    }

    #[test]
    fn finds_the_connecting_sockets_owner() {
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let proxy: SocketAddr = "127.0.0.1:15432".parse().unwrap();
        let lo = ne_hex([127, 0, 0, 1]);
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {lo}:3C48 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1\n\
             1: {lo}:3C48 {lo}:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 2 1\n\
             2: {lo}:9C40 {lo}:3C48 01 00000000:00000000 00:00000000 00000000  1001        0 3 1\n\
             3: {lo}:9C41 {lo}:3C48 06 00000000:00000000 03:00000000 00000000     0        0 0 3\n"
        );
        // A time-wait entry (a client that closed) shows root and no inode: no owner.
        let closed: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        assert_eq!(owner_in_table(&table, closed, proxy), None);
        // The client's socket (local = the client, remote = the proxy), not the proxy's own.
        assert_eq!(owner_in_table(&table, client, proxy), Some(1001));
        assert_eq!(owner_in_table(&table, proxy, client), Some(1000));
        let other: SocketAddr = "127.0.0.1:40002".parse().unwrap();
        assert_eq!(owner_in_table(&table, other, proxy), None);
        // A dual-stack listener sees the IPv4 client as ::ffff:127.0.0.1.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().unwrap();
        assert_eq!(owner_in_table(&table, mapped, proxy), Some(1001));
        assert_eq!(owner_in_table("garbage\n\u{0} x y", client, proxy), None);
    }

    /// Both ways of finding the owner agree on real connections, IPv4 and IPv6, and neither
    /// finds a connection that is not there.
    #[tokio::test]
    async fn a_real_loopback_connection_is_ours_by_either_lookup() {
        for loopback in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = TcpListener::bind(loopback).await else {
                continue; // no IPv6 here
            };
            let address = listener.local_addr().unwrap();
            let _client = TcpStream::connect(address).await.unwrap();
            let (stream, peer) = listener.accept().await.unwrap();
            let local = stream.local_addr().unwrap();
            let own = own_uid().unwrap();
            assert_eq!(diag_owner(peer, local).unwrap(), Some(own), "{loopback}");
            let from_proc = ["/proc/net/tcp", "/proc/net/tcp6"]
                .iter()
                .filter_map(|table| std::fs::read_to_string(table).ok())
                .find_map(|table| owner_in_table(&table, peer, local));
            assert_eq!(from_proc, Some(own), "{loopback}");
            assert_eq!(tcp_owner(local, peer), Some(own));
            assert!(Allowed::this_account().unwrap().permits(own));
            let mut gone = peer;
            gone.set_port(peer.port().wrapping_add(1).max(1));
            assert_eq!(diag_owner(gone, local).unwrap(), None, "{loopback}");
        }
    }

    /// A client that closed at once leaves a time-wait entry the kernel shows as root's: it
    /// must not count as connected.
    #[tokio::test]
    async fn a_closed_client_has_no_owner() {
        use tokio::io::AsyncWriteExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let local = stream.local_addr().unwrap();
        client.write_all(b"sent before closing").await.unwrap();
        drop(client);
        // The FIN has arrived once the proxy's side reads the end of the stream.
        let mut stream = stream;
        let mut sink = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut sink)
            .await
            .unwrap();
        assert_eq!(diag_owner(peer, local).unwrap(), None);
        let from_proc = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|table| std::fs::read_to_string(table).ok())
            .find_map(|table| owner_in_table(&table, peer, local));
        assert_eq!(from_proc, None);
    }

    #[test]
    fn short_or_error_answers_name_no_owner() {
        assert_eq!(diag_uid(&[]), None);
        let mut error = vec![0u8; 100];
        error[4..6].copy_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
        assert_eq!(diag_uid(&error), None);
        let mut short = vec![0u8; 40];
        short[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert_eq!(diag_uid(&short), None);
        let v4: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        assert_eq!(diag_request(v4, v6), None, "one family");
        assert_eq!(diag_request(v4, v4).map(|r| r.len()), Some(72));
    }
}
