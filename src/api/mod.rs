//! The gRPC adapter: each RPC converts its request, calls one [`Broker`] method, and converts
//! the result back.

mod convert;

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::auth::{self, Caller, Role};
use crate::broker::Broker;
use crate::proto;
use crate::proto::broker_service_server::BrokerService;
use crate::rate::{Budget, RateLimits};

/// Response header of UpdateSubscription when `topics` was updated: how many pending
/// deliveries of topics no longer matched were dropped.
pub const DROPPED_DELIVERIES_HEADER: &str = "herald-dropped-deliveries";

/// The `herald.v1.BrokerService` gRPC service.
pub struct BrokerApi {
    broker: Arc<Broker>,
    rates: RateLimits,
}

impl BrokerApi {
    /// Wraps the domain service, with per-key rate limits.
    pub fn new(broker: Arc<Broker>, rates: RateLimits) -> Self {
        BrokerApi { broker, rates }
    }

    /// For a key limited to some topics: fails unless the subscription is within them. Fails
    /// closed: a subscription that cannot be read is the call's error (`NotFound` for an
    /// unknown one, `Unavailable` while the store is), never a pass.
    async fn require_subscription(&self, caller: &Caller, id: &str) -> Result<(), Status> {
        if let Caller::Key(key) = caller
            && !key.topics.is_empty()
        {
            let subscription = self.broker.get_subscription(id).await?;
            caller.require_subscription(&subscription)?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl BrokerService for BrokerApi {
    async fn publish(
        &self,
        request: Request<proto::PublishRequest>,
    ) -> Result<Response<proto::PublishResponse>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Publish, "Publish")?;
        caller.require_topic(&request.get_ref().topic)?;
        self.rates.check(&caller, Budget::Publish)?;
        let input = convert::publish_input(request);
        let published = self.broker.publish(input).await?;
        Ok(Response::new(convert::publish_response(published)))
    }

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<proto::Subscription>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Subscribe, "Subscribe")?;
        caller.require_patterns(&request.get_ref().topics)?;
        self.rates.check(&caller, Budget::Manage)?;
        let input = convert::subscribe_input(request.into_inner())?;
        let subscription = self.broker.subscribe(input).await?;
        Ok(Response::new(convert::subscription(subscription, true)))
    }

    async fn get_subscription(
        &self,
        request: Request<proto::GetSubscriptionRequest>,
    ) -> Result<Response<proto::Subscription>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Read, "GetSubscription")?;
        let subscription = self.broker.get_subscription(&request.get_ref().id).await?;
        caller.require_subscription(&subscription)?;
        Ok(Response::new(convert::subscription(subscription, false)))
    }

    async fn list_subscriptions(
        &self,
        request: Request<proto::ListSubscriptionsRequest>,
    ) -> Result<Response<proto::ListSubscriptionsResponse>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Read, "ListSubscriptions")?;
        let request = request.into_inner();
        let state = convert::state_filter(request.state)?;
        let page = self
            .broker
            .list_subscriptions(request.page_size, &request.page_token)
            .await?;
        Ok(Response::new(proto::ListSubscriptionsResponse {
            subscriptions: page
                .items
                .into_iter()
                // A key limited to some topics sees only the subscriptions within them, and a
                // state filter keeps only those in the state (a page may then hold fewer than
                // page_size).
                .filter(|subscription| caller.may_see(subscription))
                .filter(|subscription| {
                    state.is_none_or(|state| subscription.control.state == state)
                })
                .map(|subscription| convert::subscription(subscription, false))
                .collect(),
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn unsubscribe(
        &self,
        request: Request<proto::UnsubscribeRequest>,
    ) -> Result<Response<proto::UnsubscribeResponse>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Subscribe, "Unsubscribe")?;
        self.require_subscription(&caller, &request.get_ref().id)
            .await?;
        self.rates.check(&caller, Budget::Manage)?;
        let dropped_deliveries = self.broker.unsubscribe(&request.get_ref().id).await?;
        Ok(Response::new(proto::UnsubscribeResponse {
            dropped_deliveries,
        }))
    }

    async fn list_pending(
        &self,
        request: Request<proto::ListPendingRequest>,
    ) -> Result<Response<proto::ListPendingResponse>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Read, "ListPending")?;
        self.require_subscription(&caller, &request.get_ref().subscription_id)
            .await?;
        let request = request.into_inner();
        let page = self
            .broker
            .list_pending(
                &request.subscription_id,
                &request.topic,
                request.dead_letters_only,
                request.page_size,
                &request.page_token,
            )
            .await?;
        Ok(Response::new(proto::ListPendingResponse {
            deliveries: page.items.into_iter().map(convert::pending).collect(),
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn get_subscription_status(
        &self,
        request: Request<proto::GetSubscriptionStatusRequest>,
    ) -> Result<Response<proto::SubscriptionStatus>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Read, "GetSubscriptionStatus")?;
        let request = request.into_inner();
        let (subscription, page) = self
            .broker
            .subscription_status(
                &request.subscription_id,
                request.page_size,
                &request.page_token,
            )
            .await?;
        caller.require_subscription(&subscription)?;
        Ok(Response::new(proto::SubscriptionStatus {
            partitions: page
                .items
                .into_iter()
                .map(|status| convert::partition_status(&subscription, status))
                .collect(),
            subscription: Some(convert::subscription(subscription, false)),
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn pause_subscription(
        &self,
        request: Request<proto::PauseSubscriptionRequest>,
    ) -> Result<Response<proto::Subscription>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Operate, "PauseSubscription")?;
        self.require_subscription(&caller, &request.get_ref().subscription_id)
            .await?;
        let request = request.into_inner();
        let subscription = self
            .broker
            .pause(&request.subscription_id, &request.topic, &request.reason)
            .await?;
        Ok(Response::new(convert::subscription(subscription, false)))
    }

    async fn resume_subscription(
        &self,
        request: Request<proto::ResumeSubscriptionRequest>,
    ) -> Result<Response<proto::Subscription>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Operate, "ResumeSubscription")?;
        self.require_subscription(&caller, &request.get_ref().subscription_id)
            .await?;
        let request = request.into_inner();
        let subscription = self
            .broker
            .resume(&request.subscription_id, &request.topic)
            .await?;
        Ok(Response::new(convert::subscription(subscription, false)))
    }

    async fn retry_now(
        &self,
        request: Request<proto::RetryNowRequest>,
    ) -> Result<Response<proto::RetryNowResponse>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Operate, "RetryNow")?;
        self.require_subscription(&caller, &request.get_ref().subscription_id)
            .await?;
        let request = request.into_inner();
        let sequence = self
            .broker
            .retry_now(&request.subscription_id, &request.topic)
            .await?;
        Ok(Response::new(proto::RetryNowResponse { sequence }))
    }

    async fn skip_head(
        &self,
        request: Request<proto::SkipHeadRequest>,
    ) -> Result<Response<proto::SkipHeadResponse>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Operate, "SkipHead")?;
        self.require_subscription(&caller, &request.get_ref().subscription_id)
            .await?;
        let request = request.into_inner();
        self.broker
            .skip_head(&request.subscription_id, &request.topic, request.sequence)
            .await?;
        Ok(Response::new(proto::SkipHeadResponse {}))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<proto::RedriveDeadLettersRequest>,
    ) -> Result<Response<proto::RedriveDeadLettersResponse>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Operate, "RedriveDeadLetters")?;
        self.require_subscription(&caller, &request.get_ref().subscription_id)
            .await?;
        let request = request.into_inner();
        let redriven_count = self
            .broker
            .redrive(&request.subscription_id, &request.topic, &request.sequences)
            .await?;
        Ok(Response::new(proto::RedriveDeadLettersResponse {
            redriven_count,
        }))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<proto::PurgeDeadLettersRequest>,
    ) -> Result<Response<proto::PurgeDeadLettersResponse>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Operate, "PurgeDeadLetters")?;
        self.require_subscription(&caller, &request.get_ref().subscription_id)
            .await?;
        let request = request.into_inner();
        let purged_count = self
            .broker
            .purge(&request.subscription_id, &request.topic, &request.sequences)
            .await?;
        Ok(Response::new(proto::PurgeDeadLettersResponse {
            purged_count,
        }))
    }

    async fn replay(
        &self,
        request: Request<proto::ReplayRequest>,
    ) -> Result<Response<proto::ReplayResponse>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Operate, "Replay")?;
        self.require_subscription(&caller, &request.get_ref().subscription_id)
            .await?;
        let request = request.into_inner();
        let (start, end) = convert::replay_bounds(&request)?;
        let replayed = self
            .broker
            .replay(
                &request.subscription_id,
                &request.topic,
                start,
                end,
                request.limit,
            )
            .await?;
        Ok(Response::new(proto::ReplayResponse {
            replayed_count: replayed.count,
            skipped_count: replayed.skipped,
            next_sequence: replayed.next_sequence.unwrap_or(0),
        }))
    }

    async fn update_subscription(
        &self,
        request: Request<proto::UpdateSubscriptionRequest>,
    ) -> Result<Response<proto::Subscription>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Subscribe, "UpdateSubscription")?;
        let id = request
            .get_ref()
            .subscription
            .as_ref()
            .map(|subscription| subscription.id.clone())
            .unwrap_or_default();
        self.require_subscription(&caller, &id).await?;
        self.rates.check(&caller, Budget::Manage)?;
        let input = convert::update_input(request.into_inner())?;
        if input.mask.iter().any(|path| path == "topics") {
            // A key limited to some topics may not widen a subscription beyond them.
            caller.require_patterns(&input.topics)?;
        }
        let updated = self.broker.update_subscription(input).await?;
        let mut response = Response::new(convert::subscription(updated.subscription, false));
        if let Some(dropped) = updated.dropped_deliveries {
            response.metadata_mut().insert(
                DROPPED_DELIVERIES_HEADER,
                tonic::metadata::MetadataValue::from(dropped),
            );
        }
        Ok(response)
    }

    async fn rotate_secret(
        &self,
        request: Request<proto::RotateSecretRequest>,
    ) -> Result<Response<proto::RotateSecretResponse>, Status> {
        let caller = auth::caller(&request);
        caller.require(Role::Subscribe, "RotateSecret")?;
        self.require_subscription(&caller, &request.get_ref().subscription_id)
            .await?;
        self.rates.check(&caller, Budget::Manage)?;
        let grace = convert::grace(request.get_ref())?;
        let request = request.into_inner();
        let (subscription, secret) = self
            .broker
            .rotate_secret(
                &request.subscription_id,
                &request.secret,
                grace,
                &request.etag,
            )
            .await?;
        Ok(Response::new(proto::RotateSecretResponse {
            subscription: Some(convert::subscription(subscription, false)),
            secret,
        }))
    }
}
