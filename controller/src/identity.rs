//! Who a connecting client is, from what it presented (client id, certificate), and the rights
//! each kind of client gets (PROTOCOL §1, §4). Pure: no I/O.

use fleet_broker::{ConnectInfo, Rights, Trust};
use fleet_certs::Fingerprint;

use fleet_protocol::{ClaimedClient, Filter, Mac, PhoneLeaf, Serial, StationLeaf, Topic};

use crate::station::Presented;

/// A client whose presented identity is consistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Station {
        serial: Serial,
        presented: Presented,
    },
    /// An operator: its tenant and its name together are who it is; `serial` and `key` are the
    /// certificate it presented (checked against the operator registry at admission).
    Operator {
        id: OperatorId,
        serial: String,
        key: Fingerprint,
    },
    Phone {
        mac: Mac,
        presented: PhonePresented,
    },
}

/// An operator: tenant and name together. Two operators of different tenants may share a
/// name; they never share anything else (sessions, responses, the tenant of a command).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OperatorId {
    pub tenant: String,
    pub name: String,
}

impl std::fmt::Display for OperatorId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.tenant)
    }
}

/// What a phone presented at CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhonePresented {
    /// A certificate issued by the fleet CA at provisioning (CN = MAC, OU = phone, O = tenant).
    Certificate { serial: String, tenant: String },
    /// No certificate: username = MAC, password = PAP or empty.
    Pap { password: Option<String> },
}

/// Rights of a phone (PROTOCOL §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhoneRights {
    Unprovisioned,
    Provisioned,
}

/// The station rights levels of PROTOCOL §4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StationRights {
    Pending,
    Legacy,
    Authorized,
}

/// Binds the client id to the certificate's identity. `Err` carries the refusal reason.
pub fn identify(info: &ConnectInfo) -> Result<Identity, String> {
    let cert = match &info.certificate {
        Some(c) => Some((
            fleet_certs::inspect(&c.der).map_err(|e| format!("unreadable certificate: {e}"))?,
            c.trust,
        )),
        None => None,
    };
    let claimed = ClaimedClient::of(&info.client_id);
    if let ClaimedClient::Station(serial) = claimed {
        let serial = serial.map_err(|e| format!("client id: {e}"))?;
        let presented = match cert {
            None => Presented::NoCertificate,
            Some((cert, Trust::SelfSigned | Trust::ManufacturerCa)) => {
                if cert.common_name.as_deref() != Some(serial.as_str()) {
                    return Err(format!(
                        "certificate CN {:?} does not match client id serial {serial}",
                        cert.common_name.unwrap_or_default()
                    ));
                }
                Presented::Key(cert.fingerprint)
            }
            Some((_, Trust::FleetCa)) => {
                return Err("a fleet CA certificate cannot identify a station".into())
            }
        };
        return Ok(Identity::Station { serial, presented });
    }
    if let ClaimedClient::Phone(mac) = claimed {
        let mac = mac.map_err(|e| format!("client id: {e}"))?;
        let presented = match cert {
            Some((cert, Trust::FleetCa)) => {
                if cert.organizational_unit.as_deref() != Some("phone")
                    || cert.common_name.as_deref() != Some(mac.as_str())
                {
                    return Err(format!("the certificate does not identify phone {mac}"));
                }
                let tenant = cert
                    .organization
                    .ok_or("phone certificate without a tenant")?;
                PhonePresented::Certificate {
                    serial: cert.serial_number,
                    tenant,
                }
            }
            Some(_) => return Err("a phone certificate must be issued by the fleet CA".into()),
            None => {
                // PROTOCOL §1: username = MAC (either form), password = PAP or empty.
                let username = info.username.as_deref().unwrap_or_default();
                if Mac::parse(username).ok().as_ref() != Some(&mac) {
                    return Err(format!("username must be the MAC {mac}"));
                }
                PhonePresented::Pap {
                    password: info.password.clone().filter(|p| !p.is_empty()),
                }
            }
        };
        return Ok(Identity::Phone { mac, presented });
    }
    match cert {
        Some((cert, Trust::FleetCa)) if cert.organizational_unit.as_deref() == Some("operator") => {
            let name = cert
                .common_name
                .filter(|n| fleet_certs::check_name("operator name", n).is_ok())
                .ok_or("operator certificate without a usable CN")?;
            // No O is the default tenant (PROTOCOL §1); an O that is no usable tenant name is
            // refused, never quietly taken for `default`.
            let tenant = match cert.organization {
                None => crate::station::DEFAULT_TENANT.to_owned(),
                Some(t) if fleet_certs::check_name("tenant", &t).is_ok() && !t.starts_with('.') => {
                    t
                }
                Some(_) => return Err("operator certificate with an unusable O (tenant)".into()),
            };
            Ok(Identity::Operator {
                id: OperatorId { tenant, name },
                serial: cert.serial_number,
                key: cert.fingerprint,
            })
        }
        Some(_) => Err("certificate identifies no operator".into()),
        None => Err("client id identifies no device and no certificate was presented".into()),
    }
}

/// The fingerprint a station presented, if any.
pub fn presented_key(p: &Presented) -> Option<Fingerprint> {
    p.key()
}

/// A station's rights at `level` (PROTOCOL §4). Only an authorized station may retain: a
/// pending or legacy client could otherwise plant retained messages on the station's topics
/// that the real station, once accepted, would receive.
pub fn station_rights(serial: &Serial, level: StationRights) -> Rights {
    let topic = |leaf| Topic::station(serial.clone(), leaf).to_string();
    let cmd = topic(StationLeaf::Cmd);
    let chunk = topic(StationLeaf::FirmwareChunk);
    let announce = vec![topic(StationLeaf::AuthRequest), topic(StationLeaf::Status)];
    // What a station says to the controller goes from its session straight to the controller
    // (the inbox), never through the router: a station that only talks to the controller
    // needs no router link at all.
    let inbox = [announce.clone(), vec![topic(StationLeaf::FirmwareRequest)]].concat();
    match level {
        StationRights::Pending => Rights {
            publish: announce.clone(),
            subscribe: vec![cmd.clone()],
            inbox: announce,
            mailbox: vec![cmd],
            ..Rights::default()
        },
        StationRights::Legacy => {
            let firmware = Filter::StationFirmware(serial.clone()).to_string();
            Rights {
                publish: [announce, vec![firmware.clone()]].concat(),
                subscribe: vec![cmd.clone(), firmware],
                inbox,
                mailbox: vec![cmd, chunk],
                ..Rights::default()
            }
        }
        StationRights::Authorized => {
            let tree = Filter::StationTree(serial.clone()).to_string();
            Rights {
                publish: vec![tree.clone()],
                publish_deny: vec![cmd.clone()],
                subscribe: vec![tree],
                inbox,
                mailbox: vec![cmd, chunk],
                retain: true,
            }
        }
    }
}

/// A phone's rights (PROTOCOL §4); only a provisioned phone may retain.
pub fn phone_rights(mac: &Mac, level: PhoneRights) -> Rights {
    let topic = |leaf| Topic::phone(mac.clone(), leaf).to_string();
    let response = topic(PhoneLeaf::ProvisionResponse);
    let complete = topic(PhoneLeaf::ProvisionComplete);
    let to_controller = vec![topic(PhoneLeaf::ProvisionRequest), complete];
    let mut rights = Rights {
        publish: to_controller.clone(),
        subscribe: vec![response.clone()],
        mailbox: vec![response],
        // Straight to the controller, past the router; `provision/complete` is acknowledged
        // only once committed (`Controller::inbox_device`).
        inbox: to_controller,
        ..Rights::default()
    };
    if level == PhoneRights::Provisioned {
        let data = Filter::PhoneData(mac.clone()).to_string();
        rights.publish.push(data.clone());
        rights.subscribe.push(data);
        rights.retain = true;
    }
    rights
}

/// An operator's rights (PROTOCOL §4). Its requests go from its session straight to the
/// controller (the inbox), tagged with the session, and its responses come back to that session
/// only (the mailbox): two operators of different tenants with the same name share a topic name
/// but never a message.
pub fn operator_rights(name: &str, tenant: &str) -> Rights {
    let request = Topic::OperatorRequest(name.to_owned()).to_string();
    let response = Topic::OperatorResponse(name.to_owned()).to_string();
    Rights {
        publish: vec![request.clone()],
        subscribe: vec![
            response.clone(),
            Filter::Events(tenant.to_owned()).to_string(),
        ],
        inbox: vec![request],
        mailbox: vec![response],
        ..Rights::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_broker::{MqttVersion, PresentedCertificate};

    fn info(client_id: &str, cert: Option<(Vec<u8>, Trust)>) -> ConnectInfo {
        ConnectInfo {
            session_id: 1,
            client_id: client_id.into(),
            username: None,
            password: None,
            peer_addr: "127.0.0.1:1".parse().expect("addr"),
            certificate: cert.map(|(der, trust)| PresentedCertificate { der, trust }),
            version: MqttVersion::V311,
        }
    }

    /// `station-<serial>`, for any text, well-formed or not.
    fn station_id(serial: &str) -> String {
        format!("{}{serial}", fleet_protocol::STATION_CLIENT_ID_PREFIX)
    }

    #[test]
    fn station_client_id_must_match_the_certificate() {
        let cert = fleet_certs::self_signed_station("S1").expect("cert");
        let ok = identify(&info(
            &station_id("S1"),
            Some((cert.cert_der.clone(), Trust::SelfSigned)),
        ));
        assert!(matches!(
            ok,
            Ok(Identity::Station {
                presented: Presented::Key(_),
                ..
            })
        ));
        let wrong = identify(&info(
            &station_id("S2"),
            Some((cert.cert_der.clone(), Trust::SelfSigned)),
        ));
        assert!(wrong.is_err());
        let bad_serial = identify(&info(&station_id("S_1"), None));
        assert!(bad_serial.is_err());
        let legacy = identify(&info(&station_id("S1"), None));
        assert!(matches!(
            legacy,
            Ok(Identity::Station {
                presented: Presented::NoCertificate,
                ..
            })
        ));
    }

    #[test]
    fn operators_need_a_fleet_ca_certificate() {
        let ca = fleet_certs::FleetCa::generate("t").expect("ca");
        let op = ca.issue_operator("alice", "default").expect("op");
        let ok = identify(&info(
            "anything",
            Some((op.cert_der.clone(), Trust::FleetCa)),
        ));
        let inspected = fleet_certs::inspect(&op.cert_der).expect("inspect");
        let (serial, key) = (inspected.serial_number, inspected.fingerprint);
        assert_eq!(
            ok,
            Ok(Identity::Operator {
                id: OperatorId {
                    tenant: "default".into(),
                    name: "alice".into(),
                },
                serial,
                key,
            })
        );
        // The same certificate self-signed-looking or from another anchor is no operator.
        assert!(identify(&info(
            "anything",
            Some((op.cert_der.clone(), Trust::ManufacturerCa))
        ))
        .is_err());
        let station = fleet_certs::self_signed_station("alice").expect("cert");
        assert!(identify(&info(
            "anything",
            Some((station.cert_der, Trust::SelfSigned))
        ))
        .is_err());
        assert!(identify(&info("anything", None)).is_err());
        // A fleet CA certificate does not make a station.
        assert!(identify(&info(
            &station_id("alice"),
            Some((op.cert_der, Trust::FleetCa))
        ))
        .is_err());
    }

    #[test]
    fn only_authorized_stations_and_provisioned_phones_retain() {
        let s = Serial::parse("S1").expect("serial");
        assert!(!station_rights(&s, StationRights::Pending).retain);
        assert!(!station_rights(&s, StationRights::Legacy).retain);
        assert!(station_rights(&s, StationRights::Authorized).retain);
        let m = Mac::parse("aabbccddeeff").expect("mac");
        assert!(!phone_rights(&m, PhoneRights::Unprovisioned).retain);
        assert!(phone_rights(&m, PhoneRights::Provisioned).retain);
        assert!(!operator_rights("admin", "default").retain);
    }

    #[test]
    fn an_operators_requests_go_to_the_inbox_and_its_responses_come_by_mailbox() {
        let r = operator_rights("admin", "acme");
        let request = |name: &str| Topic::OperatorRequest(name.into()).to_string();
        assert!(r.may_publish(&request("admin")));
        assert!(r.is_inbox(&request("admin")));
        assert!(r.is_mailbox(&Topic::OperatorResponse("admin".into()).to_string()));
        assert!(!r.may_publish(&request("bob")));
        assert!(r.may_subscribe(&Filter::Events("acme".into()).to_string()));
        assert!(!r.may_subscribe(&Filter::Events("default".into()).to_string()));
    }

    #[test]
    fn what_devices_say_to_the_controller_goes_to_the_inbox_and_their_data_to_the_router() {
        let s = Serial::parse("S1").expect("serial");
        let topic = |leaf| Topic::station(s.clone(), leaf).to_string();
        let to_controller = [
            StationLeaf::AuthRequest,
            StationLeaf::Status,
            StationLeaf::FirmwareRequest,
        ];
        for level in [
            StationRights::Pending,
            StationRights::Legacy,
            StationRights::Authorized,
        ] {
            let rights = station_rights(&s, level);
            // Wherever it may say it at all (a pending station may not ask for firmware).
            for t in to_controller
                .map(topic)
                .iter()
                .filter(|t| rights.may_publish(t))
            {
                assert!(rights.is_inbox(t), "{level:?}: {t}");
            }
        }
        let authorized = station_rights(&s, StationRights::Authorized);
        let data = Topic::StationData(s.clone(), "x".into()).to_string();
        assert!(authorized.may_publish(&data) && !authorized.is_inbox(&data));

        let m = Mac::parse("aabbccddeeff").expect("mac");
        let phone = |leaf| Topic::phone(m.clone(), leaf).to_string();
        let provisioned = phone_rights(&m, PhoneRights::Provisioned);
        assert!(provisioned.is_inbox(&phone(PhoneLeaf::ProvisionRequest)));
        assert!(provisioned.is_inbox(&phone(PhoneLeaf::ProvisionComplete)));
        let data = Topic::PhoneData(m.clone(), "x".into()).to_string();
        assert!(provisioned.may_publish(&data) && !provisioned.is_inbox(&data));
    }

    #[test]
    fn station_rights_follow_protocol_section_4() {
        let s = Serial::parse("S1").expect("serial");
        let topic = |leaf| Topic::station(s.clone(), leaf).to_string();
        let data = Topic::StationData(s.clone(), "x".into()).to_string();
        let pending = station_rights(&s, StationRights::Pending);
        assert!(pending.may_publish(&topic(StationLeaf::AuthRequest)));
        assert!(!pending.may_publish(&data));
        assert!(!pending.may_subscribe(&topic(StationLeaf::FirmwareChunk)));
        let legacy = station_rights(&s, StationRights::Legacy);
        assert!(legacy.may_publish(&topic(StationLeaf::FirmwareRequest)));
        assert!(legacy.may_subscribe(&topic(StationLeaf::FirmwareChunk)));
        let auth = station_rights(&s, StationRights::Authorized);
        assert!(auth.may_publish(&data));
        assert!(!auth.may_publish(&topic(StationLeaf::Cmd)));
        let other = Serial::parse("S2").expect("serial");
        assert!(!auth.may_subscribe(&Topic::StationCmd(other).to_string()));
        assert!(!auth.may_subscribe("#"));
    }
}
