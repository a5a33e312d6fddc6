//! Capability lists: read from `* CAPABILITY` data or a `[CAPABILITY ...]` code, filtered, and
//! written back in place.

use super::encode::{self, EncodeError, EncodeOptions, Value};
use super::response::Response;

/// An ordered set of capability names, compared without regard to ASCII case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapabilitySet {
    items: Vec<String>,
}

impl CapabilitySet {
    /// The capabilities a response advertises, if it advertises any.
    pub fn from_response(response: &Response) -> Option<CapabilitySet> {
        let (_, tokens) = response.capabilities()?;
        let items = tokens
            .iter()
            .filter_map(|t| t.atom(&response.raw))
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Some(CapabilitySet { items })
    }

    pub fn from_names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> CapabilitySet {
        CapabilitySet {
            items: names.into_iter().map(Into::into).collect(),
        }
    }

    pub fn names(&self) -> &[String] {
        &self.items
    }

    pub fn has(&self, name: &str) -> bool {
        self.items.iter().any(|c| c.eq_ignore_ascii_case(name))
    }

    /// Adds a capability unless present, keeping the order of the rest.
    pub fn add(&mut self, name: &str) {
        if !self.has(name) {
            self.items.push(name.to_string());
        }
    }

    pub fn remove(&mut self, name: &str) {
        self.items.retain(|c| !c.eq_ignore_ascii_case(name));
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.items.retain(|c| keep(c));
    }

    /// Removes what the proxy cannot relay: COMPRESS (it would hide the stream from the parser),
    /// SASL mechanisms with channel binding (`-PLUS`: the binding is to the upstream's TLS
    /// channel, which the client never sees), and the upstream's STARTTLS and LOGINDISABLED,
    /// which describe the upstream leg, not the client's.
    pub fn strip_unrelayable(&mut self) {
        self.retain(|c| {
            let upper = c.to_ascii_uppercase();
            !(upper.starts_with("COMPRESS=")
                || (upper.starts_with("AUTH=") && upper.ends_with("-PLUS"))
                || upper == "STARTTLS"
                || upper == "LOGINDISABLED")
        });
    }

    /// LITERAL+ or LITERAL- (RFC 7888) on offer.
    pub fn literal_plus(&self) -> bool {
        self.has("LITERAL+")
    }
}

/// The response with its capability list replaced by `caps`; `None` when the response carries no
/// capability list. Every byte around the list is kept.
pub fn rewrite(response: &Response, caps: &CapabilitySet) -> Option<Result<Vec<u8>, EncodeError>> {
    let (span, _) = response.capabilities()?;
    let atoms: Result<Vec<u8>, EncodeError> = (|| {
        let mut out = encode::Encoded::new();
        for (i, name) in caps.items.iter().enumerate() {
            if i > 0 {
                out.bytes.push(b' ');
            }
            out.value(
                &Value::Atom(name.as_bytes().to_vec()),
                EncodeOptions::SERVER,
            )?;
        }
        Ok(out.bytes)
    })();
    let atoms = match atoms {
        Ok(a) => a,
        Err(e) => return Some(Err(e)),
    };
    // Splice the raw atom bytes in place of the old list: they were validated as atoms above.
    let mut out = Vec::with_capacity(response.raw.len() + 16);
    out.extend_from_slice(&response.raw[..span.start]);
    out.extend_from_slice(&atoms);
    out.extend_from_slice(&response.raw[span.end..]);
    Some(Ok(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::response::parse_response;
    use bytes::Bytes;

    fn resp(raw: &str) -> Response {
        parse_response(Bytes::copy_from_slice(raw.as_bytes())).expect("parses")
    }

    #[test]
    fn strips_what_cannot_be_relayed_and_adds_starttls() {
        let r = resp(
            "* OK [CAPABILITY IMAP4rev1 SASL-IR STARTTLS AUTH=PLAIN AUTH=SCRAM-SHA-256-PLUS COMPRESS=DEFLATE LOGINDISABLED] Ready.\r\n",
        );
        let mut caps = CapabilitySet::from_response(&r).expect("caps");
        caps.strip_unrelayable();
        caps.add("STARTTLS");
        let out = rewrite(&r, &caps).expect("has caps").expect("valid");
        assert_eq!(
            out,
            b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN STARTTLS] Ready.\r\n"
        );
    }

    #[test]
    fn untagged_capability_data_and_tagged_codes() {
        let r = resp("* CAPABILITY IMAP4rev1 COMPRESS=DEFLATE IDLE\r\n");
        let mut caps = CapabilitySet::from_response(&r).expect("caps");
        caps.strip_unrelayable();
        assert_eq!(
            rewrite(&r, &caps).and_then(Result::ok),
            Some(b"* CAPABILITY IMAP4rev1 IDLE\r\n".to_vec())
        );
        let r = resp("a1 OK [CAPABILITY IMAP4rev1 LITERAL+] Logged in\r\n");
        assert!(CapabilitySet::from_response(&r).is_some_and(|c| c.literal_plus()));
        assert!(CapabilitySet::from_response(&resp("a1 OK done\r\n")).is_none());
    }

    #[test]
    fn an_injected_capability_name_is_refused() {
        let r = resp("* CAPABILITY IMAP4rev1\r\n");
        let caps = CapabilitySet::from_names(["IMAP4rev1", "X]\r\n* BYE"]);
        assert!(matches!(rewrite(&r, &caps), Some(Err(_))));
    }
}
