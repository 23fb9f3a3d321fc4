//! The hickory request handler: cluster names from `zone`, the rest through `forward`.

use std::sync::Arc;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_server::proto::rr::{DNSClass, Name, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tracing::{debug, warn};

use crate::cluster::Cluster;
use crate::forward::Forwarder;
use crate::zone::{Answer, Outcome, Zone};

pub struct Handler {
    pub zone: Zone,
    pub cluster: Cluster,
    pub forwarder: Arc<Forwarder>,
}

/// A reply before it is encoded.
struct Reply {
    metadata: Metadata,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

impl Reply {
    fn error(req: &Metadata, code: ResponseCode) -> Reply {
        let mut metadata = Metadata::response_from_request(req);
        metadata.response_code = code;
        metadata.recursion_available = true;
        Reply {
            metadata,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }

    fn local(req: &Metadata, a: Answer) -> Reply {
        let mut metadata = Metadata::response_from_request(req);
        metadata.response_code = a.code;
        metadata.authoritative = true;
        metadata.recursion_available = true;
        Reply {
            metadata,
            answers: a.answers,
            authorities: a.soa.into_iter().collect(),
            additionals: a.additionals,
        }
    }
}

impl Handler {
    async fn reply(&self, request: &Request) -> Reply {
        let req = &request.metadata;
        if req.message_type != MessageType::Query || req.op_code != OpCode::Query {
            return Reply::error(req, ResponseCode::NotImp);
        }
        let Ok(info) = request.request_info() else {
            return Reply::error(req, ResponseCode::FormErr);
        };
        let query = info.query;
        let name: Name = query.name().into();
        let qtype = query.query_type();
        if self.forwarder.is_probe(&name) {
            return Reply::error(req, ResponseCode::ServFail);
        }
        if query.query_class() != DNSClass::IN && self.zone.owns(&name) {
            return Reply::error(req, ResponseCode::Refused);
        }
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            return Reply::error(req, ResponseCode::Refused);
        }
        if self.zone.owns(&name) && !self.cluster.ready().await {
            return Reply::error(req, ResponseCode::ServFail);
        }
        match self.zone.answer(&self.cluster, &name, qtype) {
            Outcome::Local(a) => Reply::local(req, a),
            Outcome::Alias(a, target) => {
                let mut reply = Reply::local(req, a);
                let mut q = Query::query(target, qtype);
                q.set_query_class(DNSClass::IN);
                match self.forwarder.forward(q).await {
                    Ok(m) => {
                        reply.answers.extend(m.answers);
                        reply.metadata.response_code = m.metadata.response_code;
                    }
                    Err(e) => debug!(error = %e, "resolve ExternalName target"),
                }
                reply
            }
            Outcome::Forward => {
                let mut q = Query::query(name, qtype);
                q.set_query_class(query.query_class());
                match self.forwarder.forward(q).await {
                    Ok(m) => {
                        let mut metadata = Metadata::response_from_request(req);
                        metadata.response_code = m.metadata.response_code;
                        metadata.recursion_available = true;
                        Reply {
                            metadata,
                            answers: m.answers,
                            authorities: m.authorities,
                            additionals: m.additionals,
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "forward");
                        Reply::error(req, ResponseCode::ServFail)
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let reply = self.reply(request).await;
        let edns = request.edns.as_ref().map(|e| {
            let mut r = Edns::new();
            r.set_max_payload(e.max_payload().max(512));
            r
        });
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let metadata = reply.metadata;
        let response = builder.build(
            metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            std::iter::empty(),
            reply.additionals.iter(),
        );
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                warn!(error = %e, "send DNS response");
                let mut metadata = metadata;
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}
