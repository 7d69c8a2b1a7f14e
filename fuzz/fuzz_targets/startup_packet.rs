#![no_main]
//! The `pg-entra proxy`'s reader of a client's first packet (the command's own file, included
//! here: the command is a binary, not a library): any bytes give a packet or a typed error,
//! never a panic; what is read agrees with its length word; a startup message read and
//! written again reads the same.

#[allow(dead_code)]
#[path = "../../src/bin/pg-entra/proxy/startup.rs"]
mod startup;

use startup::{Packet, packet_length, parse};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(packet) = parse(data) else { return };
    let length_word: [u8; 4] = data[..4].try_into().expect("a packet has a length word");
    assert_eq!(packet_length(length_word), Ok(data.len()));
    if let Packet::Startup(startup) = packet {
        let _ = startup.wants_replication();
        let mut body = (3u32 << 16 | u32::from(startup.minor_version)).to_be_bytes().to_vec();
        for (name, value) in &startup.parameters {
            body.extend(name.as_bytes());
            body.push(0);
            body.extend(value.as_bytes());
            body.push(0);
        }
        for option in &startup.protocol_options {
            body.extend(option.as_bytes());
            body.extend([0, b'x', 0]);
        }
        body.push(0);
        let mut again = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        again.extend(body);
        if again.len() <= startup::MAX_PACKET {
            let Ok(Packet::Startup(reread)) = parse(&again) else {
                panic!("a startup message written from a read one does not read back");
            };
            assert_eq!(reread.parameters, startup.parameters);
            assert_eq!(reread.minor_version, startup.minor_version);
        }
    }
});
