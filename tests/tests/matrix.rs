//! The permission matrix: every route the node serves, from the binary's own route table
//! (`thali routes`), called by a read, a write and an admin peer and a stranger's key over
//! mutual TLS (the reader also once more with the admin's password in its headers, which
//! must change nothing), and by the local admin and an anonymous client on the loopback API.
//! Design documents are aimed at through every route that writes, spelled plain,
//! percent-encoded (`%2F`, `%2f`, `%5F`) and through `COPY`; only admins may write them. A route
//! the table lists and this test has no case for fails the test.

use serde_json::{json, Value};
use std::cell::Cell;
use thali_node::peer::Identity;
use thali_tests::{thali_bin, Client, PeerClient, PeerNode, Resp};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Reader,
    Writer,
    DbAdmin,
    Local,
    /// No credentials, on the loopback API.
    Anonymous,
    /// A key no `_security` names, on the peer listener.
    Stranger,
    /// The read key sending the admin's Basic credentials too, on the peer listener: a peer
    /// is its key, whatever its headers say, so it must get exactly what `Reader` gets.
    ReaderWithAdminPassword,
}

const ALL: [Who; 7] = [
    Who::Reader,
    Who::Writer,
    Who::DbAdmin,
    Who::Local,
    Who::Anonymous,
    Who::Stranger,
    Who::ReaderWithAdminPassword,
];

/// Whose answers `who` must get.
fn judged_as(who: Who) -> Who {
    match who {
        Who::ReaderWithAdminPassword => Who::Reader,
        w => w,
    }
}
/// Everyone with access to the database `m`.
const EVERYONE: &[Who] = &[Who::Reader, Who::Writer, Who::DbAdmin, Who::Local];
/// Anyone at all.
const PUBLIC: &[Who] = &ALL;
/// Anyone on the loopback API.
const LOOPBACK: &[Who] = &[Who::Local, Who::Anonymous];
/// Any key over mutual TLS (and the local admin, who is told to use TLS: not refused).
const ANY_KEY: &[Who] = &[
    Who::Reader,
    Who::Writer,
    Who::DbAdmin,
    Who::Stranger,
    Who::Local,
];
const WRITERS: &[Who] = &[Who::Writer, Who::DbAdmin, Who::Local];
const ADMINS: &[Who] = &[Who::DbAdmin, Who::Local];
const LOCAL: &[Who] = &[Who::Local];

struct World {
    p: PeerNode,
    reader: PeerClient,
    writer: PeerClient,
    admin: PeerClient,
    stranger: PeerClient,
    n: Cell<u32>,
    /// Design documents the local admin created as setup.
    seeded: std::cell::RefCell<Vec<String>>,
}

struct Call {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

impl Call {
    fn new(method: &str, path: String) -> Call {
        Call {
            method: method.into(),
            path,
            headers: Vec::new(),
            body: None,
        }
    }
    fn json(mut self, v: Value) -> Call {
        self.headers
            .push(("Content-Type".into(), "application/json".into()));
        self.body = Some(serde_json::to_vec(&v).unwrap());
        self
    }
    fn header(mut self, k: &str, v: &str) -> Call {
        self.headers.push((k.into(), v.into()));
        self
    }
    fn raw(mut self, ctype: &str, body: &[u8]) -> Call {
        self.headers.push(("Content-Type".into(), ctype.into()));
        self.body = Some(body.to_vec());
        self
    }
}

/// How a call's outcome is read.
#[derive(Clone, Copy)]
enum Judge {
    /// 2xx is success, 401/403 refusal.
    Status,
    /// `_bulk_docs`: success when no document failed, refusal when one is `forbidden`.
    Bulk,
    /// Anything but 401/403 is success (an admin route answering 400 or 404 to its input).
    NotRefused,
}

type Make = Box<dyn Fn(&World, Who, &str) -> Call>;

struct Case {
    label: String,
    allowed: &'static [Who],
    judge: Judge,
    make: Make,
}

fn case(
    label: &str,
    allowed: &'static [Who],
    make: impl Fn(&World, Who, &str) -> Call + 'static,
) -> Case {
    Case {
        label: label.into(),
        allowed,
        judge: Judge::Status,
        make: Box::new(make),
    }
}

impl World {
    fn send(&self, who: Who, c: &Call) -> Resp {
        let h: Vec<(&str, &str)> = c
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let body = c.body.as_deref();
        match who {
            Who::Local => self.p.node.raw(&c.method, &c.path, &h, body),
            Who::Reader => self.reader.raw(&c.method, &c.path, &h, body),
            Who::Writer => self.writer.raw(&c.method, &c.path, &h, body),
            Who::DbAdmin => self.admin.raw(&c.method, &c.path, &h, body),
            Who::Stranger => self.stranger.raw(&c.method, &c.path, &h, body),
            Who::ReaderWithAdminPassword => {
                let admin = thali_tests::admin_auth();
                let mut h = h.clone();
                h.retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
                h.push(("Authorization", admin.as_str()));
                self.reader.raw(&c.method, &c.path, &h, body)
            }
            Who::Anonymous => {
                let h: Vec<(String, String)> = c.headers.clone();
                thali_tests::request(self.p.node.addr, &c.method, &c.path, &h, body)
            }
        }
    }

    fn tag(&self, who: Who) -> String {
        self.n.set(self.n.get() + 1);
        format!("{}-{}", format!("{who:?}").to_lowercase(), self.n.get())
    }

    /// Creates (as the local admin) `path` with `body`; its revision.
    fn seed(&self, path: &str, body: Value) -> String {
        if let Some(name) = path.strip_prefix("/m/_design/") {
            self.seeded.borrow_mut().push(format!("_design/{name}"));
        }
        let r = self.p.node.put(path, &body);
        assert!(r.status == 201, "seed {path}: {} {}", r.status, r.text());
        r.json()["rev"].as_str().unwrap().to_string()
    }

    fn seed_att(&self, path: &str, rev: Option<&str>) -> String {
        let path = match rev {
            Some(r) => format!("{path}?rev={r}"),
            None => path.to_string(),
        };
        let r = self
            .p
            .node
            .raw("PUT", &path, &[("Content-Type", "text/plain")], Some(b"hi"));
        assert_eq!(r.status, 201, "seed {path}: {}", r.text());
        r.json()["rev"].as_str().unwrap().to_string()
    }
}

const DDOC: fn() -> Value = || json!({"language": "lua"});

fn multipart_ddoc() -> (String, Vec<u8>) {
    let body = b"--bnd\r\nContent-Type: application/json\r\n\r\n{\"language\":\"lua\",\"_attachments\":{\"a.txt\":{\"follows\":true,\"content_type\":\"text/plain\",\"length\":2}}}\r\n--bnd\r\nContent-Disposition: attachment; filename=\"a.txt\"\r\n\r\nhi\r\n--bnd--".to_vec();
    ("multipart/related; boundary=\"bnd\"".into(), body)
}

/// The cases of one route and method. Empty means the matrix does not know the route.
/// A pairing message past its size (17 KiB, over the 16 KiB cap): refused (413) to every key
/// before it is read, and to everyone else as any pairing message is.
fn oversized(path: &'static str) -> Case {
    Case {
        judge: Judge::NotRefused,
        ..case(&format!("{path} oversized"), ANY_KEY, move |_, _, _| {
            Call::new("POST", path.into()).json(json!({ "secret": "x".repeat(17 << 10) }))
        })
    }
}

fn cases(kind: &str, method: &str) -> Vec<Case> {
    let m = method.to_string();
    let ms = method_static(method);
    let read = matches!(method, "GET" | "HEAD");
    let mk = move |path: &str| Call::new(&m, path.to_string());
    let g = |path: &'static str| {
        let mk = mk.clone();
        move |_: &World, _: Who, _: &str| mk(path)
    };
    match (kind, method) {
        ("Root", _) => vec![case("root", PUBLIC, g("/"))],
        ("Up", _) => vec![case("up", LOOPBACK, g("/_up"))],
        ("AllDbs", _) => vec![case("all_dbs", LOCAL, g("/_all_dbs"))],
        ("Uuids", _) => vec![case("uuids", LOCAL, g("/_uuids"))],
        ("ActiveTasks", _) => vec![case("active_tasks", LOCAL, g("/_active_tasks"))],
        ("SchedulerJobs", _) => vec![case("scheduler", LOCAL, g("/_scheduler/jobs"))],
        // Peers may not test the admin's password; the local admin logs in.
        // Logging in is what an anonymous client does; peers may not test passwords.
        ("Session", "POST") => vec![case("session login", LOOPBACK, |_, _, _| {
            Call::new("POST", "/_session".into())
                .json(json!({"name": "admin", "password": thali_tests::PASSWORD}))
        })],
        ("Dashboard", _) => vec![case("dashboard", LOOPBACK, g("/_thali"))],
        ("Events", _) => vec![case("events", LOCAL, g("/_thali/events?once=true"))],
        ("Session", _) => vec![Case {
            judge: if read {
                Judge::Status
            } else {
                Judge::NotRefused
            },
            ..case("session", PUBLIC, g("/_session"))
        }],
        ("Replicate", "POST") => vec![case("replicate", LOCAL, |_, _, t| {
            Call::new("POST", "/_replicate".into())
                .json(json!({"source": "m", "target": format!("rep-{t}"), "create_target": true}))
        })],
        ("Db", "GET" | "HEAD") => vec![case("db info", EVERYONE, g("/m"))],
        ("Db", "POST") => vec![
            case("post doc", WRITERS, |_, _, _| {
                Call::new("POST", "/m".into()).json(json!({"v": 1}))
            }),
            case("post design doc", ADMINS, |_, _, t| {
                Call::new("POST", "/m".into())
                    .json(json!({"_id": format!("_design/{t}"), "language": "lua"}))
            }),
        ],
        ("Db", "PUT") => vec![case("create db", LOCAL, |_, _, t| {
            Call::new("PUT", format!("/new-{t}"))
        })],
        ("Db", "DELETE") => vec![case("delete db", LOCAL, |w, _, t| {
            w.p.node.put(&format!("/gone-{t}"), &json!({}));
            Call::new("DELETE", format!("/gone-{t}"))
        })],
        ("AllDocs", _) => vec![case("all_docs", EVERYONE, move |_, _, _| {
            let c = Call::new(ms, "/m/_all_docs".into());
            if read {
                c
            } else {
                c.json(json!({"keys": ["seed"]}))
            }
        })],
        ("BulkDocs", "POST") => {
            let bulk = |label: &str, allowed, f: fn(&str) -> Value| Case {
                judge: Judge::Bulk,
                ..case(label, allowed, move |_, _, t| {
                    Call::new("POST", "/m/_bulk_docs".into()).json(f(t))
                })
            };
            vec![
                bulk("bulk doc", WRITERS, |t| json!({"docs": [{"_id": t}]})),
                bulk(
                    "bulk design doc",
                    ADMINS,
                    |t| json!({"docs": [{"_id": format!("_design/{t}")}]}),
                ),
                bulk(
                    "bulk design doc, replicated",
                    ADMINS,
                    |t| json!({"new_edits": false, "docs": [{"_id": format!("_design/{t}"), "_rev": "1-0123456789abcdef0123456789abcdef"}]}),
                ),
            ]
        }
        ("BulkGet", "POST") => vec![case("bulk_get", EVERYONE, |_, _, _| {
            Call::new("POST", "/m/_bulk_get".into()).json(json!({"docs": [{"id": "seed"}]}))
        })],
        ("RevsDiff", "POST") => vec![case("revs_diff", EVERYONE, |_, _, _| {
            Call::new("POST", "/m/_revs_diff".into()).json(json!({"seed": ["1-abc"]}))
        })],
        ("Changes", _) => vec![case("changes", EVERYONE, move |_, _, _| {
            let c = Call::new(ms, "/m/_changes".into());
            if read {
                c
            } else {
                c.json(json!({}))
            }
        })],
        ("EnsureFullCommit", "POST") => vec![case("ensure_full_commit", EVERYONE, |_, _, _| {
            Call::new("POST", "/m/_ensure_full_commit".into()).json(json!({}))
        })],
        ("Compact", "POST") => vec![case("compact", ADMINS, |_, _, _| {
            Call::new("POST", "/m/_compact".into()).json(json!({}))
        })],
        ("ViewCleanup", "POST") => vec![case("view_cleanup", ADMINS, |_, _, _| {
            Call::new("POST", "/m/_view_cleanup".into()).json(json!({}))
        })],
        ("Security", _) => vec![case("security", ADMINS, move |w, _, _| {
            let c = Call::new(ms, "/m/_security".into());
            if read {
                c
            } else {
                c.json(w.p.node.get("/m/_security").json())
            }
        })],
        ("RevsLimit", _) => vec![case(
            "revs_limit",
            if read { EVERYONE } else { ADMINS },
            move |_, _, _| {
                let c = Call::new(ms, "/m/_revs_limit".into());
                if read {
                    c
                } else {
                    c.json(json!(1000))
                }
            },
        )],
        ("LocalDocs", _) => vec![case("local_docs", WRITERS, g("/m/_local_docs"))],
        // Readers keep their own `_local` documents (checkpoints): everyone may, each in its
        // own space for readers.
        ("Local", "GET" | "HEAD") => vec![case("local read", EVERYONE, move |w, who, t| {
            let put = Call::new("PUT", format!("/m/_local/{t}")).json(json!({"s": 1}));
            assert_eq!(w.send(setter(who), &put).status, 201);
            Call::new(ms, format!("/m/_local/{t}"))
        })],
        ("Local", "PUT") => vec![case("local put", EVERYONE, |_, _, t| {
            Call::new("PUT", format!("/m/_local/{t}")).json(json!({"s": 1}))
        })],
        ("Local", "DELETE") => vec![case("local delete", EVERYONE, |w, who, t| {
            let put = Call::new("PUT", format!("/m/_local/{t}")).json(json!({"s": 1}));
            assert_eq!(w.send(setter(who), &put).status, 201);
            Call::new("DELETE", format!("/m/_local/{t}?rev=0-1"))
        })],
        ("Doc", "GET" | "HEAD") => vec![case("doc read", EVERYONE, g("/m/seed"))],
        ("Doc", "PUT") => vec![case("doc put", WRITERS, |_, _, t| {
            Call::new("PUT", format!("/m/{t}")).json(json!({"v": 1}))
        })],
        ("Doc", "DELETE") => vec![case("doc delete", WRITERS, |w, _, t| {
            let rev = w.seed(&format!("/m/{t}"), json!({"v": 1}));
            Call::new("DELETE", format!("/m/{t}?rev={rev}"))
        })],
        ("Doc", "COPY") => {
            let mut v = vec![case("copy to doc", WRITERS, |_, _, t| {
                Call::new("COPY", "/m/seed".into()).header("Destination", t)
            })];
            for spelling in [
                "_design/",
                "_design%2F",
                "_design%2f",
                "%5Fdesign/",
                "%5fdesign%2F",
            ] {
                v.push(case(
                    &format!("copy to {spelling}"),
                    ADMINS,
                    move |_, _, t| {
                        Call::new("COPY", "/m/seed".into())
                            .header("Destination", &format!("{spelling}{t}"))
                    },
                ));
            }
            v
        }
        ("DesignDoc", "GET" | "HEAD") => vec![case("ddoc read", EVERYONE, g("/m/_design/seed"))],
        ("DesignDoc", "PUT") => {
            let mut v = Vec::new();
            for spelling in [
                "_design/",
                "_design%2F",
                "_design%2f",
                "%5Fdesign/",
                "%5fdesign%2f",
            ] {
                v.push(case(
                    &format!("ddoc put {spelling}"),
                    ADMINS,
                    move |_, _, t| Call::new("PUT", format!("/m/{spelling}{t}")).json(DDOC()),
                ));
            }
            v.push(case("ddoc put multipart", ADMINS, |_, _, t| {
                let (ct, body) = multipart_ddoc();
                Call::new("PUT", format!("/m/_design/{t}")).raw(&ct, &body)
            }));
            v
        }
        ("DesignDoc", "DELETE") => ["_design/", "_design%2F", "%5Fdesign/"]
            .into_iter()
            .map(|spelling| {
                case(
                    &format!("ddoc delete {spelling}"),
                    ADMINS,
                    move |w, _, t| {
                        let rev = w.seed(&format!("/m/_design/{t}"), DDOC());
                        Call::new("DELETE", format!("/m/{spelling}{t}?rev={rev}"))
                    },
                )
            })
            .collect(),
        ("DesignDoc", "COPY") => vec![
            case("copy ddoc to doc", WRITERS, |_, _, t| {
                Call::new("COPY", "/m/_design/seed".into()).header("Destination", t)
            }),
            case("copy ddoc to ddoc", ADMINS, |_, _, t| {
                Call::new("COPY", "/m/_design/seed".into())
                    .header("Destination", &format!("_design/{t}"))
            }),
        ],
        ("View", _) => vec![case("view", EVERYONE, move |_, _, _| {
            let c = Call::new(ms, "/m/_design/seed/_view/v".into());
            if read {
                c
            } else {
                c.json(json!({}))
            }
        })],
        ("ViewInfo", _) => vec![case("view info", EVERYONE, g("/m/_design/seed/_info"))],
        ("Attachment", "GET" | "HEAD") => vec![case("att read", EVERYONE, g("/m/seed/a.txt"))],
        ("Attachment", "PUT") => vec![case("att put", WRITERS, |_, _, t| {
            Call::new("PUT", format!("/m/{t}/a.txt")).raw("text/plain", b"hi")
        })],
        ("Attachment", "DELETE") => vec![case("att delete", WRITERS, |w, _, t| {
            let rev = w.seed_att(&format!("/m/{t}/a.txt"), None);
            Call::new("DELETE", format!("/m/{t}/a.txt?rev={rev}"))
        })],
        ("DesignAttachment", "GET" | "HEAD") => {
            vec![case("ddoc att read", EVERYONE, g("/m/_design/seed/a.txt"))]
        }
        ("DesignAttachment", "PUT") => ["_design/", "_design%2F", "%5Fdesign/"]
            .into_iter()
            .map(|spelling| {
                case(
                    &format!("ddoc att put {spelling}"),
                    ADMINS,
                    move |_, _, t| {
                        Call::new("PUT", format!("/m/{spelling}{t}/a.txt")).raw("text/plain", b"hi")
                    },
                )
            })
            .collect(),
        ("DesignAttachment", "DELETE") => vec![case("ddoc att delete", ADMINS, |w, _, t| {
            let rev = w.seed(&format!("/m/_design/{t}"), DDOC());
            let rev = w.seed_att(&format!("/m/_design/{t}/a.txt"), Some(&rev));
            Call::new("DELETE", format!("/m/_design/{t}/a.txt?rev={rev}"))
        })],
        ("DesignDocs", _) => vec![case("design_docs", EVERYONE, move |_, _, _| {
            let c = Call::new(ms, "/m/_design_docs".into());
            if read {
                c
            } else {
                c.json(json!({}))
            }
        })],
        ("Find", "POST") => vec![case("find", EVERYONE, |_, _, _| {
            Call::new("POST", "/m/_find".into()).json(json!({"selector": {"_id": "seed"}}))
        })],
        ("Explain", "POST") => vec![case("explain", EVERYONE, |_, _, _| {
            Call::new("POST", "/m/_explain".into()).json(json!({"selector": {}}))
        })],
        ("Index", "GET" | "HEAD") => vec![case("index list", EVERYONE, g("/m/_index"))],
        // A JSON index is a design document: only admins create or delete one.
        ("Index", "POST") => vec![case("index create", ADMINS, |_, _, t| {
            Call::new("POST", "/m/_index".into())
                .json(json!({"index": {"fields": ["x"]}, "ddoc": t, "name": "i"}))
        })],
        ("IndexDoc", "DELETE") => vec![case("index delete", ADMINS, |w, _, t| {
            w.seed(
                &format!("/m/_design/{t}"),
                json!({"language": "query", "views": {"i": {"map": {"fields": {"x": "asc"}},
                    "reduce": "_count", "options": {"def": {"fields": ["x"]}}}}}),
            );
            Call::new("DELETE", format!("/m/_index/{t}/json/i"))
        })],
        ("Invites", _) if read => vec![case("invites", LOCAL, g("/_thali/invites"))],
        ("Invites", "POST") => vec![case("invite create", LOCAL, |_, _, t| {
            Call::new("POST", "/_thali/invites".into()).json(json!({"db": format!("inv-{t}")}))
        })],
        ("Invite", "DELETE") => vec![case("invite revoke", LOCAL, |w, _, _| {
            let id = w.invite("m")["id"].as_str().unwrap().to_string();
            Call::new("DELETE", format!("/_thali/invites/{id}"))
        })],
        // The node cannot join its own invite (400): what matters is who is refused.
        ("Join", "POST") => vec![Case {
            judge: Judge::NotRefused,
            ..case("join", LOCAL, |w, _, _| {
                let uri = w.invite("m")["uri"].clone();
                Call::new("POST", "/_thali/join".into()).json(json!({ "invite": uri }))
            })
        }],
        // Any peer key may show an invite's secret; the local admin is told to use TLS (400).
        ("PairAccept", "POST") => vec![
            Case {
                judge: Judge::NotRefused,
                ..case("pair accept", ANY_KEY, |w, _, t| {
                    let uri = w.invite(&format!("acc-{t}"))["uri"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    let secret = uri.split("secret=").nth(1).unwrap()[..32].to_string();
                    Call::new("POST", "/_thali/accept".into()).json(json!({ "secret": secret }))
                })
            },
            oversized("/_thali/accept"),
        ],
        ("Paired", _) if read => vec![case("paired", LOCAL, g("/_thali/paired"))],
        ("PairedPeer", "DELETE") => vec![Case {
            judge: Judge::NotRefused,
            ..case("paired remove", LOCAL, g("/_thali/paired/nobody"))
        }],
        // Cancelling an unknown session: 404 to whoever may ask, 403 to the rest.
        ("Pairing", "POST") => vec![Case {
            judge: Judge::NotRefused,
            ..case("pairing action", LOCAL, |_, _, _| {
                Call::new("POST", "/_thali/pairing".into())
                    .json(json!({"action": "cancel", "session": "x"}))
            })
        }],
        ("PairStep", "POST") => vec![
            Case {
                judge: Judge::NotRefused,
                ..case("pairing step", ANY_KEY, |_, _, _| {
                    Call::new("POST", "/_thali/pair".into())
                        .json(json!({"step": "cancel", "session": "x"}))
                })
            },
            oversized("/_thali/pair"),
        ],
        // Discovery is off on this node (400 to the admin).
        ("Nearby", _) => vec![Case {
            judge: Judge::NotRefused,
            ..case("nearby", LOCAL, g("/_thali/peers"))
        }],
        ("NodeStats", _) => vec![case("stats", LOCAL, g("/_node/_local/_stats"))],
        ("NodePrometheus", _) => vec![case("prometheus", LOCAL, g("/_node/_local/_prometheus"))],
        ("NodeConfig", _) if read => vec![case("config", LOCAL, g("/_node/_local/_config"))],
        ("NodeConfig", "PUT") => vec![case("config set", LOCAL, |_, _, _| {
            Call::new("PUT", "/_node/_local/_config/log/level".into()).json(json!("warn"))
        })],
        // Nothing can be deleted (400 to the admin).
        ("NodeConfig", "DELETE") => vec![Case {
            judge: Judge::NotRefused,
            ..case("config delete", LOCAL, g("/_node/_local/_config/log/level"))
        }],
        ("NodeSystem", _) => vec![case("system", LOCAL, g("/_node/_local/_system"))],
        ("Membership", _) => vec![case("membership", LOCAL, g("/_membership"))],
        ("DbsInfo", _) if read => vec![case("dbs_info", LOCAL, g("/_dbs_info"))],
        ("DbsInfo", "POST") => vec![case("dbs_info keys", LOCAL, |_, _, _| {
            Call::new("POST", "/_dbs_info".into()).json(json!({"keys": ["m"]}))
        })],
        _ => Vec::new(),
    }
}

/// Who sets up a case's data: the caller itself, or the local admin for callers with no access.
fn setter(who: Who) -> Who {
    match who {
        Who::Anonymous | Who::Stranger => Who::Local,
        w => w,
    }
}

impl World {
    /// An invite to `db` made by the local admin.
    fn invite(&self, db: &str) -> Value {
        let r = self.p.node.post("/_thali/invites", &json!({ "db": db }));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }
}

fn method_static(m: &str) -> &'static str {
    match m {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "COPY" => "COPY",
        other => panic!("unknown method {other}"),
    }
}

/// Did the call succeed (`Some(true)`), get refused (`Some(false)`), or neither?
fn outcome(judge: Judge, r: &Resp) -> Option<bool> {
    match judge {
        Judge::Status => match r.status {
            200..=299 => Some(true),
            401 | 403 => Some(false),
            _ => None,
        },
        Judge::NotRefused => Some(!matches!(r.status, 401 | 403)),
        Judge::Bulk => {
            if matches!(r.status, 401 | 403) {
                return Some(false);
            }
            if r.status != 201 {
                return None;
            }
            let errors: Vec<Value> = r
                .json()
                .as_array()
                .unwrap()
                .iter()
                .filter(|x| x.get("error").is_some())
                .cloned()
                .collect();
            match errors.first() {
                None => Some(true),
                Some(e) if e["error"] == "forbidden" => Some(false),
                Some(_) => None,
            }
        }
    }
}

#[test]
fn every_route_as_every_principal() {
    let out = std::process::Command::new(thali_bin())
        .arg("routes")
        .output()
        .unwrap();
    assert!(out.status.success());
    let table: Value = serde_json::from_slice(&out.stdout).unwrap();
    let table = table.as_array().unwrap();
    assert!(table.len() >= 20, "{table:?}");

    let p = PeerNode::start("matrix");
    let (r, wr, a) = (
        Identity::generate().unwrap(),
        Identity::generate().unwrap(),
        Identity::generate().unwrap(),
    );
    let w = World {
        reader: p.client(&r),
        writer: p.client(&wr),
        admin: p.client(&a),
        stranger: p.client(&Identity::generate().unwrap()),
        p,
        n: Cell::new(0),
        seeded: Default::default(),
    };
    assert_eq!(w.p.node.put("/m", &json!({})).status, 201);
    let sec = json!({
        "admins": {"names": [a.key_id()], "roles": []},
        "members": {"names": [wr.key_id()], "roles": []},
        "readers": {"names": [r.key_id()], "roles": []},
    });
    assert_eq!(w.p.node.put("/m/_security", &sec).status, 200);
    let rev = w.seed("/m/seed", json!({"v": 1}));
    w.seed_att("/m/seed/a.txt", Some(&rev));
    let rev = w.seed(
        "/m/_design/seed",
        json!({"language": "lua", "views": {"v": {"map": "function(doc) emit(doc._id, 1) end"}}}),
    );
    w.seed_att("/m/_design/seed/a.txt", Some(&rev));

    let mut checked = 0;
    let mut failures = Vec::new();
    for route in table {
        let kind = route["kind"].as_str().unwrap();
        for method in route["methods"].as_array().unwrap() {
            let method = method.as_str().unwrap();
            let cs = cases(kind, method);
            assert!(
                !cs.is_empty(),
                "route {kind} ({}) {method} has no case in the permission matrix",
                route["path"]
            );
            for c in cs {
                for who in ALL {
                    let tag = w.tag(who);
                    let call = (c.make)(&w, judged_as(who), &tag);
                    let resp = w.send(who, &call);
                    let want = c.allowed.contains(&judged_as(who));
                    checked += 1;
                    if outcome(c.judge, &resp) != Some(want) {
                        failures.push(
                            format!(
                                "{kind} {method} [{}] as {who:?}: {} {} {} (expected {})",
                                c.label,
                                call.method,
                                call.path,
                                resp.status,
                                if want { "success" } else { "refusal" },
                            ) + &format!(" {}", resp.text().chars().take(200).collect::<String>()),
                        );
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} calls wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // No refused write left a design document behind.
    let ddocs =
        w.p.node
            .get("/m/_all_docs?startkey=%22_design%2F%22&endkey=%22_design0%22")
            .json();
    for row in ddocs["rows"].as_array().unwrap() {
        let id = row["id"].as_str().unwrap();
        assert!(
            w.seeded.borrow().iter().any(|s| s == id)
                || id.contains("dbadmin-")
                || id.contains("local-"),
            "{id} was written by a caller below admin"
        );
    }
    eprintln!(
        "permission matrix: {checked} calls ({} principals) over {} routes, 0 unexpected",
        ALL.len(),
        table.len()
    );
}
