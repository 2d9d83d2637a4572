// Package ctx mirrors Tyk's ctx package: what a hook reads from (and sets on) the request
// the gateway passed it.
package ctx

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"time"

	"gatehouse.dev/go/apidef"
	"gatehouse.dev/go/apidef/oas"
	"gatehouse.dev/go/internal/host"
	"gatehouse.dev/go/user"
)

// What the gateway sends for a session (plugin-host's session JSON).
type wireSession struct {
	ID               string            `json:"id"`
	KeyHash          string            `json:"key_hash"`
	Rate             *float64          `json:"rate"`
	Per              *float64          `json:"per"`
	QuotaMax         int64             `json:"quota_max"`
	QuotaRenewalRate *float64          `json:"quota_renewal_rate"`
	AccessRights     []string          `json:"access_rights"`
	MetaData         map[string]string `json:"meta_data"`
	Expires          *string           `json:"expires"`
}

type cachedSession struct {
	s    *user.SessionState
	meta map[string]string
}

// GetSession returns the session of the request's key, or nil when it has none (a
// keyless API, or an authCheck hook before it created one). Changes to it take effect
// through SetSession.
func GetSession(r *http.Request) *user.SessionState {
	c := host.CallOf(r)
	if c == nil {
		return nil
	}
	if cs, ok := c.Session.(*cachedSession); ok {
		return cs.s
	}
	raw, ok := c.SessionJSON()
	if !ok {
		return nil
	}
	var w wireSession
	if err := json.Unmarshal(raw, &w); err != nil {
		host.Log(host.LevelError, "gatehouse: the gateway's session did not decode: "+err.Error())
		return nil
	}
	s := &user.SessionState{
		QuotaMax:     w.QuotaMax,
		AccessRights: map[string]user.AccessDefinition{},
		MetaData:     map[string]interface{}{},
		Alias:        w.ID,
		KeyID:        w.KeyHash,
	}
	if w.Rate != nil && w.Per != nil {
		s.Rate, s.Per = *w.Rate, *w.Per
	}
	if w.QuotaRenewalRate != nil {
		s.QuotaRenewalRate = int64(*w.QuotaRenewalRate)
	}
	for _, a := range w.AccessRights {
		s.AccessRights[a] = user.AccessDefinition{APIName: a, APIID: a}
	}
	for k, v := range w.MetaData {
		s.MetaData[k] = v
	}
	if w.Expires != nil {
		if t, err := time.Parse(time.RFC3339Nano, *w.Expires); err == nil {
			s.Expires = t.Unix()
		}
	}
	c.Session = &cachedSession{s: s, meta: w.MetaData}
	return s
}

// SetSession gives the request session s. In an authCheck hook it creates the request's
// session, which the chain then enforces (access rights, rate limit, quota); in other
// hooks it changes the session's MetaData for the rest of this request. scheduleUpdate
// and hashKey are accepted for Tyk's signature: sessions live in the gateway's config.
func SetSession(r *http.Request, s *user.SessionState, scheduleUpdate bool, hashKey ...bool) {
	c := host.CallOf(r)
	if c == nil || s == nil {
		return
	}
	meta := make(map[string]string, len(s.MetaData))
	for k, v := range s.MetaData {
		meta[k] = text(v)
	}
	id := s.KeyID
	if id == "" {
		id = r.Header.Get("Authorization")
	}
	if id == "" {
		id = s.Alias
	}
	init := host.SessionInit{ID: id, Alias: s.Alias, Meta: meta, QuotaMax: -1}
	// As Tyk: a quota of 0 or less is no quota.
	if s.QuotaMax > 0 && s.QuotaRenewalRate > 0 {
		init.QuotaMax, init.QuotaRenewalMs = s.QuotaMax, uint64(s.QuotaRenewalRate)*1000
	}
	if s.Rate > 0 && s.Per > 0 {
		if s.Rate == math.Trunc(s.Rate) {
			init.Rate, init.PerMs = uint64(s.Rate), uint64(s.Per*1000)
		} else {
			// A fractional rate (0.5 per second) as one request per period (2 s).
			init.Rate, init.PerMs = 1, uint64(s.Per*1000/s.Rate)
		}
	}
	for name := range s.AccessRights {
		init.AccessRights = append(init.AccessRights, name)
	}
	if id == "" {
		host.Log(host.LevelError, "gatehouse: ctx.SetSession in "+c.Name()+": the session has no id (s.KeyID, an Authorization header, or s.Alias), so an authCheck hook creates none")
	} else if c.CreateSession(init) {
		c.Session = nil
		return
	}
	// Not an authCheck hook: the key's session exists; change what changed of its metadata.
	var before map[string]string
	if cs, ok := c.Session.(*cachedSession); ok {
		before = cs.meta
	}
	for k, v := range meta {
		if old, ok := before[k]; !ok || old != v {
			c.SetSessionMeta(k, v)
		}
	}
}

func text(v interface{}) string {
	switch v := v.(type) {
	case string:
		return v
	case nil:
		return ""
	case fmt.Stringer:
		return v.String()
	}
	if b, err := json.Marshal(v); err == nil {
		return string(b)
	}
	return fmt.Sprint(v)
}

// GetDefinition returns the definition of the API being called.
func GetDefinition(r *http.Request) *apidef.APIDefinition {
	c := host.CallOf(r)
	if c == nil {
		return nil
	}
	if d, ok := c.Definition.(*apidef.APIDefinition); ok {
		return d
	}
	a := c.API()
	d := &apidef.APIDefinition{
		APIID: a.ID, Name: a.Name, Slug: a.Name, Active: true,
		Proxy: apidef.ProxyConfig{ListenPath: a.ListenPath},
		Spec:  []byte(a.Spec),
	}
	if a.ConfigData != "" && a.ConfigData != "null" {
		_ = json.Unmarshal([]byte(a.ConfigData), &d.ConfigData)
	}
	var spec struct {
		Upstream struct {
			URL string `json:"url"`
		} `json:"upstream"`
		StripListenPath *bool `json:"stripListenPath"`
	}
	if json.Unmarshal(d.Spec, &spec) == nil {
		d.Proxy.TargetURL = spec.Upstream.URL
		d.Proxy.StripListenPath = spec.StripListenPath == nil || *spec.StripListenPath
	}
	c.Definition = d
	return d
}

// GetOASDefinition returns nil: Gatehouse APIs are not Tyk OAS definitions (Tyk returns
// nil the same way for Classic APIs). Use GetDefinition.
func GetOASDefinition(r *http.Request) *oas.OAS { return nil }
