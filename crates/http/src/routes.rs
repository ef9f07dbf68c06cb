//! The route table: every path the API serves, as data. The dispatcher, the authorization point
//! and `thali routes` (which the permission-matrix test reads) all start from `Route::parse`,
//! and `Kind` is matched exhaustively by each, so a new route cannot be served without being
//! classified and listed.

use super::error::ApiError;
use serde_json::{json, Value};

macro_rules! kinds {
    ($($k:ident),* $(,)?) => {
        /// What a request path names.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Kind { $($k),* }
        impl Kind {
            pub const ALL: &'static [Kind] = &[$(Kind::$k),*];
        }
    };
}

kinds!(
    Root,
    Up,
    AllDbs,
    Uuids,
    Session,
    ActiveTasks,
    Replicate,
    SchedulerJobs,
    Db,
    AllDocs,
    BulkDocs,
    BulkGet,
    RevsDiff,
    Changes,
    EnsureFullCommit,
    Compact,
    ViewCleanup,
    Security,
    RevsLimit,
    LocalDocs,
    Local,
    Doc,
    DesignDoc,
    View,
    ViewInfo,
    Attachment,
    DesignAttachment,
    DesignDocs,
    Find,
    Explain,
    Index,
    IndexDoc,
    Invites,
    Invite,
    Join,
    PairAccept,
    Paired,
    PairedPeer,
    Pairing,
    PairStep,
    Nearby,
    NodeStats,
    NodePrometheus,
    NodeSystem,
    Membership,
    DbsInfo,
    Dashboard,
    Events,
    NodeConfig,
);

/// A path template and the methods a route answers (others get 405 once authorized).
pub struct Spec {
    pub kind: Kind,
    pub path: &'static str,
    pub methods: &'static [&'static str],
}

const READ: &[&str] = &["GET", "HEAD"];

/// Every route. Placeholders: `{db}`, `{id}` (a document id), `{ddoc}` (a design document's
/// name), `{local}`, `{view}`, `{att}`.
pub const ROUTES: &[Spec] = &[
    Spec {
        kind: Kind::Root,
        path: "/",
        methods: READ,
    },
    Spec {
        kind: Kind::Up,
        path: "/_up",
        methods: READ,
    },
    Spec {
        kind: Kind::AllDbs,
        path: "/_all_dbs",
        methods: READ,
    },
    Spec {
        kind: Kind::Uuids,
        path: "/_uuids",
        methods: READ,
    },
    Spec {
        kind: Kind::Session,
        path: "/_session",
        methods: &["GET", "HEAD", "POST", "DELETE"],
    },
    Spec {
        kind: Kind::ActiveTasks,
        path: "/_active_tasks",
        methods: READ,
    },
    Spec {
        kind: Kind::Replicate,
        path: "/_replicate",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::SchedulerJobs,
        path: "/_scheduler/jobs",
        methods: READ,
    },
    Spec {
        kind: Kind::Invites,
        path: "/_thali/invites",
        methods: &["GET", "HEAD", "POST"],
    },
    Spec {
        kind: Kind::Invite,
        path: "/_thali/invites/{id}",
        methods: &["DELETE"],
    },
    Spec {
        kind: Kind::Join,
        path: "/_thali/join",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::PairAccept,
        path: "/_thali/accept",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::Paired,
        path: "/_thali/paired",
        methods: READ,
    },
    Spec {
        kind: Kind::PairedPeer,
        path: "/_thali/paired/{id}",
        methods: &["DELETE"],
    },
    Spec {
        kind: Kind::Pairing,
        path: "/_thali/pairing",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::PairStep,
        path: "/_thali/pair",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::Nearby,
        path: "/_thali/peers",
        methods: READ,
    },
    Spec {
        kind: Kind::NodeStats,
        path: "/_node/_local/_stats",
        methods: READ,
    },
    Spec {
        kind: Kind::NodePrometheus,
        path: "/_node/_local/_prometheus",
        methods: READ,
    },
    Spec {
        kind: Kind::NodeSystem,
        path: "/_node/_local/_system",
        methods: READ,
    },
    Spec {
        kind: Kind::Membership,
        path: "/_membership",
        methods: READ,
    },
    Spec {
        kind: Kind::DbsInfo,
        path: "/_dbs_info",
        methods: &["GET", "HEAD", "POST"],
    },
    Spec {
        kind: Kind::NodeConfig,
        path: "/_node/_local/_config",
        methods: &["GET", "HEAD", "PUT", "DELETE"],
    },
    Spec {
        kind: Kind::Dashboard,
        path: "/_thali",
        methods: READ,
    },
    Spec {
        kind: Kind::Events,
        path: "/_thali/events",
        methods: &["GET"],
    },
    Spec {
        kind: Kind::Db,
        path: "/{db}",
        methods: &["GET", "HEAD", "PUT", "DELETE", "POST"],
    },
    Spec {
        kind: Kind::AllDocs,
        path: "/{db}/_all_docs",
        methods: &["GET", "HEAD", "POST"],
    },
    Spec {
        kind: Kind::BulkDocs,
        path: "/{db}/_bulk_docs",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::BulkGet,
        path: "/{db}/_bulk_get",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::RevsDiff,
        path: "/{db}/_revs_diff",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::Changes,
        path: "/{db}/_changes",
        methods: &["GET", "HEAD", "POST"],
    },
    Spec {
        kind: Kind::EnsureFullCommit,
        path: "/{db}/_ensure_full_commit",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::Compact,
        path: "/{db}/_compact",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::ViewCleanup,
        path: "/{db}/_view_cleanup",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::Security,
        path: "/{db}/_security",
        methods: &["GET", "HEAD", "PUT"],
    },
    Spec {
        kind: Kind::RevsLimit,
        path: "/{db}/_revs_limit",
        methods: &["GET", "HEAD", "PUT"],
    },
    Spec {
        kind: Kind::LocalDocs,
        path: "/{db}/_local_docs",
        methods: READ,
    },
    Spec {
        kind: Kind::Local,
        path: "/{db}/_local/{local}",
        methods: &["GET", "HEAD", "PUT", "DELETE"],
    },
    Spec {
        kind: Kind::Doc,
        path: "/{db}/{id}",
        methods: &["GET", "HEAD", "PUT", "DELETE", "COPY"],
    },
    Spec {
        kind: Kind::DesignDoc,
        path: "/{db}/_design/{ddoc}",
        methods: &["GET", "HEAD", "PUT", "DELETE", "COPY"],
    },
    Spec {
        kind: Kind::View,
        path: "/{db}/_design/{ddoc}/_view/{view}",
        methods: &["GET", "HEAD", "POST"],
    },
    Spec {
        kind: Kind::ViewInfo,
        path: "/{db}/_design/{ddoc}/_info",
        methods: READ,
    },
    Spec {
        kind: Kind::Attachment,
        path: "/{db}/{id}/{att}",
        methods: &["GET", "HEAD", "PUT", "DELETE"],
    },
    Spec {
        kind: Kind::DesignAttachment,
        path: "/{db}/_design/{ddoc}/{att}",
        methods: &["GET", "HEAD", "PUT", "DELETE"],
    },
    Spec {
        kind: Kind::DesignDocs,
        path: "/{db}/_design_docs",
        methods: &["GET", "HEAD", "POST"],
    },
    Spec {
        kind: Kind::Find,
        path: "/{db}/_find",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::Explain,
        path: "/{db}/_explain",
        methods: &["POST"],
    },
    Spec {
        kind: Kind::Index,
        path: "/{db}/_index",
        methods: &["GET", "HEAD", "POST"],
    },
    Spec {
        kind: Kind::IndexDoc,
        path: "/{db}/_index/{ddoc}/json/{view}",
        methods: &["DELETE"],
    },
];

/// The route table as JSON (`thali routes`).
pub fn table_json() -> Value {
    Value::Array(
        ROUTES
            .iter()
            .map(|s| json!({"kind": format!("{:?}", s.kind), "path": s.path, "methods": s.methods}))
            .collect(),
    )
}

/// A parsed path: its kind and the names in it (decoded).
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub kind: Kind,
    pub db: String,
    /// Document id (`_design/x` for design documents) or `_local` id without the prefix.
    pub id: String,
    /// Attachment or view name.
    pub sub: String,
}

impl Route {
    fn new(kind: Kind, db: &str, id: &str, sub: &str) -> Route {
        Route {
            kind,
            db: db.to_string(),
            id: id.to_string(),
            sub: sub.to_string(),
        }
    }

    /// The route of percent-decoded path segments, or the 400 CouchDB gives for the path.
    pub fn parse(segs: &[&str]) -> Result<Route, ApiError> {
        use Kind::*;
        let k = |kind| Ok(Route::new(kind, "", "", ""));
        let d = |kind, db: &str| Ok(Route::new(kind, db, "", ""));
        match segs {
            [] => k(Root),
            ["_up"] => k(Up),
            ["_all_dbs"] => k(AllDbs),
            ["_uuids"] => k(Uuids),
            ["_session"] => k(Session),
            ["_active_tasks"] => k(ActiveTasks),
            ["_replicate"] => k(Replicate),
            ["_scheduler", "jobs"] => k(SchedulerJobs),
            ["_thali"] => k(Dashboard),
            ["_thali", "events"] => k(Events),
            ["_thali", "invites"] => k(Invites),
            ["_thali", "invites", id] => Ok(Route::new(Invite, "", id, "")),
            ["_thali", "join"] => k(Join),
            ["_thali", "accept"] => k(PairAccept),
            ["_thali", "paired"] => k(Paired),
            ["_thali", "paired", name] => Ok(Route::new(PairedPeer, "", name, "")),
            ["_thali", "pairing"] => k(Pairing),
            ["_thali", "pair"] => k(PairStep),
            ["_thali", "peers"] => k(Nearby),
            // `id` holds the node's name: `_local` or the one `_membership` lists.
            ["_node", node, "_stats", rest @ ..] => {
                Ok(Route::new(NodeStats, "", node, &rest.join("/")))
            }
            ["_node", node, "_prometheus"] => Ok(Route::new(NodePrometheus, "", node, "")),
            ["_node", node, "_system"] => Ok(Route::new(NodeSystem, "", node, "")),
            ["_node", node, "_config", rest @ ..] => {
                Ok(Route::new(NodeConfig, "", node, &rest.join("/")))
            }
            ["_membership"] => k(Membership),
            ["_dbs_info"] => k(DbsInfo),
            [name, ..] if name.starts_with('_') && !matches!(*name, "_replicator" | "_users") => {
                Err(ApiError::new(
                    400,
                    "illegal_database_name",
                    format!("Name: '{name}'. Only lowercase characters (a-z), digits (0-9), and any of the characters _, $, (, ), +, -, and / are allowed. Must begin with a letter."),
                ))
            }
            [db] => d(Db, db),
            [db, "_all_docs"] => d(AllDocs, db),
            [db, "_bulk_docs"] => d(BulkDocs, db),
            [db, "_bulk_get"] => d(BulkGet, db),
            [db, "_revs_diff"] => d(RevsDiff, db),
            [db, "_changes"] => d(Changes, db),
            [db, "_ensure_full_commit"] => d(EnsureFullCommit, db),
            [db, "_compact", ..] => d(Compact, db),
            [db, "_view_cleanup"] => d(ViewCleanup, db),
            [db, "_security"] => d(Security, db),
            [db, "_revs_limit"] => d(RevsLimit, db),
            [db, "_local_docs"] => d(LocalDocs, db),
            [db, "_design_docs"] => d(DesignDocs, db),
            [db, "_find"] => d(Find, db),
            [db, "_explain"] => d(Explain, db),
            [db, "_index"] => d(Index, db),
            [db, "_index", "_design", ddoc, "json", name] | [db, "_index", ddoc, "json", name] => {
                let id = if ddoc.starts_with("_design/") {
                    ddoc.to_string()
                } else {
                    format!("_design/{ddoc}")
                };
                Ok(Route::new(IndexDoc, db, &id, name))
            }
            [db, "_local", id] => Ok(Route::new(Local, db, id, "")),
            [_, "_local", ..] => Err(ApiError::bad_request(
                "_local documents do not accept attachments.",
            )),
            [db, id] if id.starts_with("_design/") => Ok(Route::new(DesignDoc, db, id, "")),
            [db, id, att @ ..] if id.starts_with("_design/") => {
                Ok(Route::new(DesignAttachment, db, id, &att.join("/")))
            }
            [db, "_design", name] => Ok(Route::new(DesignDoc, db, &format!("_design/{name}"), "")),
            [db, "_design", name, "_view", v] => {
                Ok(Route::new(View, db, &format!("_design/{name}"), v))
            }
            [db, "_design", name, "_info"] => {
                Ok(Route::new(ViewInfo, db, &format!("_design/{name}"), ""))
            }
            [db, "_design", name, att @ ..] => Ok(Route::new(
                DesignAttachment,
                db,
                &format!("_design/{name}"),
                &att.join("/"),
            )),
            [_, id, ..] if id.starts_with('_') => Err(ApiError::new(
                400,
                "illegal_docid",
                "Only reserved document ids may start with underscore.",
            )),
            [db, id] => Ok(Route::new(Doc, db, id, "")),
            [db, id, att @ ..] => Ok(Route::new(Attachment, db, id, &att.join("/"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(path: &str) -> Vec<String> {
        path.replace("{db}", "db")
            .replace("{id}", "doc")
            .replace("{ddoc}", "dd")
            .replace("{local}", "l")
            .replace("{view}", "v")
            .replace("{att}", "a.txt")
            .trim_start_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn every_kind_has_exactly_one_listed_route_that_parses_to_it() {
        for kind in Kind::ALL {
            let specs: Vec<&Spec> = ROUTES.iter().filter(|s| s.kind == *kind).collect();
            assert_eq!(specs.len(), 1, "{kind:?} must be listed once in ROUTES");
            let segs = fill(specs[0].path);
            let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
            let parsed = Route::parse(&segs).unwrap_or_else(|_| panic!("{kind:?}"));
            assert_eq!(parsed.kind, *kind, "{}", specs[0].path);
        }
        assert_eq!(ROUTES.len(), Kind::ALL.len());
    }

    #[test]
    fn design_ids_are_design_routes_however_spelled() {
        // Segments arrive percent-decoded: `_design%2Fx` is one segment, `%5Fdesign/x` two.
        let r = Route::parse(&["db", "_design/x"]).unwrap();
        assert_eq!((r.kind, r.id.as_str()), (Kind::DesignDoc, "_design/x"));
        let r = Route::parse(&["db", "_design", "x"]).unwrap();
        assert_eq!((r.kind, r.id.as_str()), (Kind::DesignDoc, "_design/x"));
        let r = Route::parse(&["db", "_design/x", "a"]).unwrap();
        assert_eq!(r.kind, Kind::DesignAttachment);
        assert!(Route::parse(&["db", "_foo", "att"]).is_err());
    }
}
