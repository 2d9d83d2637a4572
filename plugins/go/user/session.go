// Package user mirrors Tyk's user package: the session of the key a request carries.
package user

// AccessDefinition is one API a key may call.
type AccessDefinition struct {
	APIName  string   `json:"api_name"`
	APIID    string   `json:"api_id"`
	Versions []string `json:"versions"`
}

// SessionState is the session of a key, with the fields Tyk plugins read. ctx.GetSession
// fills it from the gateway; ctx.SetSession sends it back (an authCheck hook creates the
// request's session from it, other hooks change its MetaData for this request).
type SessionState struct {
	// Rate requests every Per seconds; 0 means no rate limit.
	Rate float64 `json:"rate"`
	Per  float64 `json:"per"`
	// QuotaMax requests every QuotaRenewalRate seconds; -1 means unlimited.
	QuotaMax         int64 `json:"quota_max"`
	QuotaRenews      int64 `json:"quota_renews"`
	QuotaRemaining   int64 `json:"quota_remaining"`
	QuotaRenewalRate int64 `json:"quota_renewal_rate"`
	// AccessRights by API name; empty on a new session means the API being called.
	AccessRights  map[string]AccessDefinition `json:"access_rights"`
	OrgID         string                      `json:"org_id"`
	Expires       int64                       `json:"expires"`
	IsInactive    bool                        `json:"is_inactive"`
	ApplyPolicies []string                    `json:"apply_policies"`
	MetaData      map[string]interface{}      `json:"meta_data"`
	Tags          []string                    `json:"tags"`
	// Alias names the key in logs and analytics: the key Secret's namespace/name, or what
	// the auth hook that created the session chose.
	Alias       string `json:"alias"`
	LastUpdated string `json:"last_updated"`

	// KeyID is what rate limits and quotas count by. An auth hook sets it (else the
	// request's Authorization header is used); for keys the gateway knows it is their
	// keyed hash, as in analytics.
	KeyID string `json:"-"`
}

// KeyHash is the key's keyed hash, as analytics show it.
func (s *SessionState) KeyHash() string { return s.KeyID }
